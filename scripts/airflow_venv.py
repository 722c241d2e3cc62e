#!/usr/bin/env python3
"""Build (once) the virtual environment that runs Apache Airflow with batchinfer's operator.

Airflow lives in an environment of its own: its pins and vLLM's are not meant to share one.
This one holds ``apache-airflow==3.3.2``, pytest (for the operator's tests) and this project
installed editable *without* an engine extra: the operator submits jobs to a Ray cluster
(Ray's job client is a dependency of batchinfer) or runs ``batchinfer submit`` from the
engine's environment, so neither vLLM nor torch is needed here. Ray 2.60, pyarrow and the
rest of batchinfer's dependencies install next to Airflow 3.3.2 with no conflict
(``pip check`` runs as the last step).

It lives under ``${BATCHINFER_HOME:-~/.cache/batchinfer}/venvs/airflow-3.3.2`` and is reused:
a stamp names what was installed. A new interpreter or Airflow version rebuilds it (about 3
minutes, 1.1 GB); a moved checkout or changed dependencies of batchinfer only reinstall
batchinfer (seconds when nothing new is needed).

Usage: python scripts/airflow_venv.py       prints the environment's python on stdout
Exit status: 0 ready, 2 it could not be built (pip's output on stderr).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

AIRFLOW_VERSION = "3.3.2"
BASE_REQUIREMENTS = (f"apache-airflow=={AIRFLOW_VERSION}", "pytest>=8")
REPO = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 1800


class SetupError(RuntimeError):
    """The environment could not be built; the message carries the tail of pip's output."""


def venv_path() -> Path:
    home = Path(os.environ.get("BATCHINFER_HOME", "~/.cache/batchinfer")).expanduser()
    return home / "venvs" / f"airflow-{AIRFLOW_VERSION}"


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Two test runs must not build one environment at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise SetupError(
            f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )


def _pip(venv: Path, *args: str) -> list[str]:
    return [str(python_of(venv)), "-m", "pip", *args, "--quiet", "--no-input"]


def project_requirements() -> list[str]:
    """batchinfer's own dependencies (no extras): when they change, reinstall it."""
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    return sorted(doc["project"]["dependencies"])


def ensure() -> Path:
    """The environment's python, building what its stamps do not vouch for.

    Two stamps, each written last: ``base`` (interpreter, Airflow) and ``project`` (this
    checkout's path and dependencies), so an interrupted build is redone, and moving the
    checkout costs a reinstall of batchinfer, not of Airflow.
    """
    venv = venv_path()
    base_stamp = venv / ".batchinfer-base"
    project_stamp = venv / ".batchinfer-project"
    base = json.dumps(
        {"requirements": BASE_REQUIREMENTS, "python": [sys.base_prefix, sys.version.split()[0]]}
    )
    project = json.dumps({"repo": str(REPO), "requirements": project_requirements()})
    with locked(venv.parent / f".{venv.name}.lock"):
        fresh = not (
            python_of(venv).exists() and base_stamp.is_file() and base_stamp.read_text() == base
        )
        if fresh:
            started = time.monotonic()
            print(f"building {venv} ({', '.join(BASE_REQUIREMENTS)}), once", file=sys.stderr)
            shutil.rmtree(venv, ignore_errors=True)
            try:
                _run([sys.executable, "-m", "venv", str(venv)])
                _run(_pip(venv, "install", *BASE_REQUIREMENTS))
            except (SetupError, subprocess.TimeoutExpired):
                shutil.rmtree(venv, ignore_errors=True)
                raise
            base_stamp.write_text(base)
            print(f"  Airflow installed in {time.monotonic() - started:.0f}s", file=sys.stderr)
        if fresh or not project_stamp.is_file() or project_stamp.read_text() != project:
            started = time.monotonic()
            project_stamp.unlink(missing_ok=True)
            _run(_pip(venv, "install", "-e", str(REPO)))
            _run([str(python_of(venv)), "-m", "pip", "check"])  # Airflow's pins and ours agree
            project_stamp.write_text(project)
            print(f"  batchinfer installed in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return python_of(venv)


def main() -> int:
    try:
        python = ensure()
    except (SetupError, subprocess.TimeoutExpired) as exc:
        print(f"error: the Airflow environment could not be built: {exc}", file=sys.stderr)
        return 2
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
