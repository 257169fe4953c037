"""Dependency floors that exclude releases with known vulnerabilities in what this project uses: the
installed versions meet them, and requirements.txt (the package's dependency list too) declares them.
And the lock (requirements.lock, written by `make lock`): it pins every requirement within its floor,
with hashes, and the installed environment is the lock's and is consistent (`pip check`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
REQUIREMENT_FILES = ("requirements.txt", "requirements-test.txt")
# The builds this project is tested with (and the local wheel cache holds); a new release is a deliberate
# change here, in requirements.txt and in the lock together.
EXACT_PINS = {"torch": Version("2.14.1"), "torchvision": Version("0.29.1")}

# package -> (lowest safe version, last vulnerable releases that must be excluded, why)
FLOORS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "pydicom": (
        "3.0.2",
        ("3.0.1", "2.4.5"),
        "CVE-2026-32711 (GHSA-v856-2rf8-9f28): a crafted DICOMDIR's ReferencedFileID escapes the "
        "File-set root (path traversal in FileSet); fixed in 3.0.2",
    ),
    "torch": (
        "2.10.0",
        ("2.5.1", "2.9.1"),
        "CVE-2025-32434 (GHSA-53q9-r3pm-6pq6): torch.load(weights_only=True) could still run code, fixed "
        "in 2.6.0; CVE-2026-24747 (GHSA-63cw-57p8-fm3p): the weights_only unpickler could corrupt memory "
        "on a crafted checkpoint, fixed in 2.10.0. Every checkpoint this project reads goes through it.",
    ),
}


def declared_requirements(path: Path) -> dict[str, Requirement]:
    """requirements.txt -> {normalised name: Requirement}; comments, blank and ``-r``/``-e`` lines skipped."""
    out = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        requirement = Requirement(line)
        out[canonicalize_name(requirement.name)] = requirement
    return out


def locked_pins(path: Path = LOCK) -> dict[str, tuple[Version, int]]:
    """A pip-compile lock -> {normalised name: (pinned version, number of hashes)}."""
    pins: dict[str, tuple[Version, int]] = {}
    name = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("--hash="):
            assert name is not None, f"a hash before any pin in {path.name}"
            pinned, hashes = pins[name]
            pins[name] = (pinned, hashes + 1)
        elif line and not raw[0].isspace() and not line.startswith(("#", "-")):
            requirement = Requirement(line.removesuffix("\\").strip())
            (spec,) = requirement.specifier  # exactly one ``==`` per package
            assert spec.operator == "==", f"{line!r} is not a pin"
            name = canonicalize_name(requirement.name)
            assert name not in pins, f"{name} pinned twice in {path.name}"
            pins[name] = (Version(spec.version), 0)
    return pins


def all_requirements() -> list:
    """(file name, requirement) for every package named in the requirement files, as test parameters."""
    return [
        pytest.param(file, requirement, id=requirement.name)
        for file in REQUIREMENT_FILES
        for requirement in declared_requirements(REPO / file).values()
    ]


def lower_bound(specifier: SpecifierSet) -> Version | None:
    """The highest lower bound a specifier set puts on versions (``>=``, ``>``, ``==``, ``~=``)."""
    bounds = [
        Version(spec.version.removesuffix(".*"))
        for spec in specifier
        if spec.operator in (">=", ">", "==", "~=", "===")
    ]
    return max(bounds, default=None)


def test_lower_bound_reads_pins_floors_and_ranges():
    assert lower_bound(SpecifierSet("==2.14.1")) == Version("2.14.1")
    assert lower_bound(SpecifierSet(">=3.0.2,<4")) == Version("3.0.2")
    assert lower_bound(SpecifierSet("~=2.10")) == Version("2.10")
    assert lower_bound(SpecifierSet("<3")) is None
    assert lower_bound(SpecifierSet("")) is None


@pytest.mark.parametrize("package", list(FLOORS))
def test_installed_version_meets_the_floor(package):
    floor, vulnerable, why = FLOORS[package]
    installed = Version(version(package))
    assert installed >= Version(floor), f"{package} {installed} < {floor}: {why}"
    assert all(Version(v) < Version(floor) for v in vulnerable)  # the table itself is consistent


@pytest.mark.parametrize("package", list(FLOORS))
def test_requirements_declare_the_floor(package):
    floor, vulnerable, why = FLOORS[package]
    requirement = declared_requirements(REPO / "requirements.txt").get(package)
    assert requirement is not None, f"requirements.txt does not list {package}"
    bound = lower_bound(requirement.specifier)
    assert bound is not None and bound >= Version(floor), f"{requirement}: needs >= {floor} ({why})"
    for release in vulnerable:
        assert not requirement.specifier.contains(release, prereleases=True), (
            f"{requirement} admits {release}"
        )


def test_the_package_installs_with_the_same_requirements():
    # pip install . reads its dependencies from requirements.txt, so the floors hold for it too.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "dependencies" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    # The test requirements pull the runtime ones in rather than restating them.
    assert "-r requirements.txt" in (REPO / "requirements-test.txt").read_text(encoding="utf-8").splitlines()


def test_locked_pins_reads_pins_and_counts_hashes(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "# header\n"
        "PyYAML==6.0.4 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via -r requirements.txt\n"
        "torch==2.14.1 \\\n    --hash=sha256:cc\n"
        "# The following packages are considered to be unsafe in a requirements file:\n"
        "setuptools==84.2.1\n",
        encoding="utf-8",
    )
    assert locked_pins(lock) == {
        "pyyaml": (Version("6.0.4"), 2),
        "torch": (Version("2.14.1"), 1),
        "setuptools": (Version("84.2.1"), 0),
    }


@pytest.mark.parametrize(("file", "requirement"), all_requirements())
def test_the_lock_pins_every_requirement_within_its_floor(file, requirement):
    pinned = locked_pins().get(canonicalize_name(requirement.name))
    assert pinned is not None, f"{file} names {requirement.name}, which the lock does not pin: run make lock"
    assert requirement.specifier.contains(pinned[0], prereleases=True), (
        f"the lock pins {requirement.name}=={pinned[0]}, outside {file}'s {requirement}: run make lock"
    )


def test_every_pin_in_the_lock_carries_hashes():
    # pip checks every downloaded file against these (hash-checking mode), whichever index served it.
    unhashed = [name for name, (_, hashes) in locked_pins().items() if hashes == 0]
    assert not unhashed, f"pins without hashes: {unhashed}"


def test_the_lock_pins_torch_and_torchvision_exactly():
    pins = locked_pins()
    assert {name: pins[name][0] for name in EXACT_PINS} == EXACT_PINS
    declared = declared_requirements(REPO / "requirements.txt")
    for name, pinned in EXACT_PINS.items():
        assert str(declared[name].specifier) == f"=={pinned}"


@pytest.mark.parametrize(("file", "requirement"), all_requirements())
def test_installed_versions_are_the_locks(file, requirement):
    pinned, _ = locked_pins()[canonicalize_name(requirement.name)]
    try:
        installed = Version(version(requirement.name))
    except PackageNotFoundError:
        pytest.fail(f"{requirement.name} ({file}) is not installed: make venv installs the lock")
    assert installed == pinned, f"{requirement.name} {installed} installed, the lock pins {pinned}: make venv"


def test_pip_check_finds_no_broken_requirements():
    done = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_installs_from_the_lock_and_make_lock_writes_it():
    # Without the flags of a make this suite may run under (make test).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}

    def dry_run(target: str) -> str:
        command = ["make", "-n", "-B", target]
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout

    venv = dry_run("venv")
    assert "pip install -q -r requirements.lock" in venv
    assert "-r requirements.txt" not in venv and "-r requirements-test.txt" not in venv
    assert "--no-deps" in venv  # the package itself resolves nothing past the lock
    lock = dry_run("lock")
    assert "pip-compile" in lock and "--generate-hashes" in lock
    assert "--output-file requirements.lock requirements.txt requirements-test.txt" in lock
    assert "# This file is autogenerated by pip-compile with Python 3.11" in LOCK.read_text(encoding="utf-8")
