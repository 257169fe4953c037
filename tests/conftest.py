"""Shared fixtures: small synthetic data made once per session, CPU only, no network."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

# Tests are CPU-only and must never reach the network (ImageNet weights come from a temp TORCH_HOME).
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """Debian's Chromium: Playwright cannot download its own browser on these machines."""
    return {
        **browser_type_launch_args,
        "executable_path": "/usr/bin/chromium",
        "args": [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
        ],
    }


# --- Disk: model checkpoints make test folders large (a VGG16 run is ~200 MB), so the suite would hold
# several GB under /tmp by its end. With `tmp_path_retention_policy = "failed"` pytest already removes
# a passed test's tmp_path; the hooks below also remove, when a test module ends, the folders its
# module-scoped fixtures and tests made with tmp_path_factory. Folders of session-scoped fixtures stay
# for the session; a module with a failure keeps all of its folders for debugging.

_session_dirs: set[str] = set()  # basetemp entries made by session-scoped fixtures
_seen: set[str] = set()  # basetemp entries that existed when the current module started
_module_failed = False


def _basetemp(config: pytest.Config) -> Path:
    return config._tmp_path_factory.getbasetemp()  # the same factory tmp_path_factory hands out


def _entries(config: pytest.Config) -> set[str]:
    return {p.name for p in _basetemp(config).iterdir()}


# Measured peak of the suite's folders: ~1 GiB (docs/benchmarks.md). Below this much free space the
# run would end in dozens of ENOSPC errors far from their cause, so it stops at once and says why.
MIN_FREE_GIB = float(os.environ.get("HEMORRHAGE_TEST_MIN_FREE_GIB", "2"))


def pytest_sessionstart(session: pytest.Session) -> None:
    base = _basetemp(session.config)
    free = shutil.disk_usage(base).free / 2**30
    if free < MIN_FREE_GIB:
        pytest.exit(
            f"only {free:.1f} GiB free under {base.parent}; the test suite needs about {MIN_FREE_GIB:.0f} GiB "
            "there (model checkpoints). Free some space or point --basetemp at a bigger disk.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope != "session":
        return (yield)
    before = _entries(request.config)
    try:
        return (yield)
    finally:
        _session_dirs.update(_entries(request.config) - before)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _module_failed
    _module_failed |= report.failed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    global _module_failed
    result = yield  # module-scoped fixtures are finalised inside this teardown when the module ends
    if nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None):
        current = _entries(item.config)
        if not _module_failed:
            for name in current - _seen - _session_dirs:
                path = _basetemp(item.config) / name
                if path.is_symlink():  # pytest's "<prefix>current" links to the newest folder
                    path.unlink()
                else:
                    shutil.rmtree(path, ignore_errors=True)
            current = _entries(item.config)
        _seen.clear()
        _seen.update(current)
        _module_failed = False
    return result


# ------------------------------------------------------------------ browser tests' shared fixtures
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


@pytest.fixture(scope="module")
def shot_dir(tmp_path_factory) -> Path:
    """Where screenshots go: HEMORRHAGE_SCREENSHOTS when set, else a temporary folder."""
    target = os.environ.get("HEMORRHAGE_SCREENSHOTS")
    folder = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def outside_requests(page) -> list[str]:
    """Every request the page makes to another host (aborted, and listed for the test to assert on)."""
    blocked: list[str] = []

    def route(r):
        local = urlparse(r.request.url).hostname in LOCAL_HOSTS
        if local or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.context.route("**/*", route)
    return blocked
