"""Shared fixtures: sample inputs and job files written into a temporary folder."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import IO, Any

import pytest

from batch.demo import write_reviews
from tests import realparts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A shell without job control starts a background command (`pytest ... &`, nohup) with SIGINT
# ignored, and every job the tests start inherits that: Ctrl-C, a lost lease and a cancelled
# batch (all SIGINT) would then stop nothing, and five tests fail for a reason that is not the
# code's. The suite is what a user's terminal gives: SIGINT raises KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    """96 sample reviews in two Parquet files (one null body, one over-long body per file)."""
    folder = tmp_path / "reviews"
    write_reviews(folder, rows=96, files=2)
    return folder


def write_job(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


# --------------------------------------------------------------------------- test order
# The Airflow and Terraform checks need tools in virtual environments of their own (built once
# per machine, minutes on a fresh one). They run last, and their environments are built in the
# background from the start of the session, while the unit and vLLM tests run.

REPO = Path(__file__).resolve().parent.parent
PREBUILDS = {
    "test_airflow.py": ["scripts/airflow_venv.py"],
    "infra": ["scripts/check_terraform.py", "--setup-only"],
}


_BUILDS: list[tuple[subprocess.Popen[bytes], IO[str]]] = []  # (build, its log) this session
_STOP_TIMEOUT_S = 30.0  # for a build to remove what it half-built after SIGTERM


def _late(item: pytest.Item) -> int:
    path = Path(str(item.fspath))
    if path.name in ("test_cluster.py", "test_airflow.py") and "integration" in path.parts:
        return 2  # together: they share the session's Ray head, started only for them
    return 3 if "infra" in path.parts else (1 if "integration" in path.parts else 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_late)  # stable: file order is kept within each group


def pytest_collection_finish(session: pytest.Session) -> None:
    if os.environ.get("BATCHINFER_NO_PREBUILD"):
        return
    wanted = set()
    for item in session.items:
        path = Path(str(item.fspath))
        for key in PREBUILDS:
            if key in (path.name, *path.parts):
                wanted.add(key)
    home = Path(os.environ.get("BATCHINFER_HOME", "~/.cache/batchinfer")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    for key in sorted(wanted):
        # Both scripts take a lock per environment, so the test that needs one waits for this
        # build instead of starting a second one; a complete environment is reused at once.
        # Each build is a process group of its own, so it can be ended with its pip (below).
        log = (home / f"prebuild-{key.replace('.py', '')}.log").open("w")
        build = subprocess.Popen(
            [sys.executable, *PREBUILDS[key]],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _BUILDS.append((build, log))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """End the builds still running: the session is over (interrupted, stopped at a failure,
    or the tests that wanted them deselected), and a build must not outlive it.

    SIGTERM goes to the build's process group (the script and its pip); the script removes
    what it half-built (scripts/toolvenv.py), and its stamp, written last, was never written,
    so the next session builds from scratch. Whatever is left after a grace period gets
    SIGKILL; an unstamped folder it leaves behind is removed by the next build.
    """
    for build, log in _BUILDS:
        if build.poll() is None:
            _signal_group(build.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                build.wait(timeout=_STOP_TIMEOUT_S)
            _signal_group(build.pid, signal.SIGKILL)  # the script, or a straggling pip
            build.wait()
        log.close()
    _BUILDS.clear()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------- skips, visibly
# A skipped test passes silently; so the end of every run says how many tests did not run, how
# many of those for a missing real part (tests/realparts.py), and whether that was allowed.


def pytest_terminal_summary(terminalreporter: Any) -> None:
    stats = terminalreporter.stats
    skipped = [r for r in stats.get("skipped", []) if getattr(r, "when", "") != "teardown"]
    missing_skips = [r for r in skipped if _reason(r).startswith(realparts.PREFIX)]
    failed = [*stats.get("failed", []), *stats.get("error", [])]
    missing_fails = [r for r in failed if _reason(r).startswith(realparts.PREFIX)]
    if not (skipped or missing_fails):
        return
    write = terminalreporter.write_line
    terminalreporter.section("skips and real parts")
    if skipped:
        write(
            f"{len(skipped)} test(s) skipped, {len(missing_skips)} of them for a missing real "
            "part (reasons in the SKIPPED lines below)"
        )
    if missing_fails:
        parts = sorted({_part(r) for r in missing_fails})
        write(
            f"{len(missing_fails)} test(s) FAILED for a missing real part ({', '.join(parts)}): "
            "CI/BATCHINFER_REQUIRE_REAL requires every part",
            red=True,
        )
    elif missing_skips:
        parts = sorted({_part(r) for r in missing_skips})
        write(
            f"not run for want of: {', '.join(parts)}; under CI (or BATCHINFER_REQUIRE_REAL=1) "
            "these fail",
            yellow=True,
        )


def _reason(report: pytest.TestReport) -> str:
    """The skip reason, or the failure's text (just the message for pytest.fail(pytrace=False))."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _part(report: pytest.TestReport) -> str:
    return _reason(report).removeprefix(realparts.PREFIX).split(":", 1)[0]
