"""Cached virtual environments for the tools that cannot share the project's (Airflow, checkov,
python-hcl2), under ``${BATCHINFER_HOME:-~/.cache/batchinfer}/venvs``.

Shared by scripts/airflow_venv.py and scripts/check_terraform.py, which import it from their own
folder (they run as scripts). Standard library only: it runs before any of these venvs exists,
and inside the python-hcl2 one.

A build is trusted only through its stamp, written last, after every step has succeeded; a build
that fails, times out or is ended leaves no stamp, so the next one starts over from an empty
folder. A lock per environment makes a second build (another test run, the test that needs the
environment) wait for the first rather than race it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

# Long enough for Airflow's install on a slow mirror (about 3 minutes here), short enough that a
# hung pip fails the run instead of stalling it.
PIP_TIMEOUT_S = 1800


class SetupError(RuntimeError):
    """An environment could not be built; the message carries the tail of the tool's output."""


def venvs_dir() -> Path:
    home = Path(os.environ.get("BATCHINFER_HOME", "~/.cache/batchinfer")).expanduser()
    return home / "venvs"


def python_of(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@contextlib.contextmanager
def locked(venv: Path) -> Iterator[None]:
    """Hold the environment's lock: two builds of one venv must not run at once."""
    path = venv.parent / f".{venv.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_stamped(venv: Path, stamp: str, expected: str) -> bool:
    """True if ``venv`` has its python and its ``stamp`` file says exactly ``expected``."""
    path = venv / stamp
    return python_of(venv).exists() and path.is_file() and path.read_text() == expected


def write_stamp(venv: Path, stamp: str, text: str) -> None:
    """Vouch for ``venv``; call only once every step has succeeded."""
    (venv / stamp).write_text(text)


def run(cmd: Sequence[str], *, timeout: float = PIP_TIMEOUT_S) -> None:
    """Run one build step; SetupError (with the end of its output) if it fails or hangs."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed the step already
        raise SetupError(f"{' '.join(cmd[:6])} ... gave no result in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise SetupError(
            f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )


def pip(venv: Path, *args: str) -> list[str]:
    """A quiet, non-interactive pip command in ``venv``."""
    return [
        str(python_of(venv)),
        "-m",
        "pip",
        *args,
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
    ]


def create(venv: Path, requirements: Sequence[str]) -> None:
    """A new ``venv`` (whatever was there is removed first) with ``requirements`` installed.

    On any failure, Ctrl-C or SIGTERM (see :func:`exit_on_sigterm`) the half-built folder is
    removed; after a SIGKILL it stays, unstamped, and the next build removes it.
    """
    shutil.rmtree(venv, ignore_errors=True)
    try:
        run([sys.executable, "-m", "venv", str(venv)])
        run(pip(venv, "install", *requirements))
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so an ended build also ends its pip (``subprocess.run``
    kills its child on any exception) and removes what it half-built."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
