"""Dependency floors that exclude releases with known vulnerabilities in what this project uses: the
installed versions meet them, and requirements.txt (the package's dependency list too) declares them."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent

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
        out[requirement.name.lower().replace("_", "-")] = requirement
    return out


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
