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

import json
import sys
import time
import tomllib
from pathlib import Path

import toolvenv

AIRFLOW_VERSION = "3.3.2"
BASE_REQUIREMENTS = (f"apache-airflow=={AIRFLOW_VERSION}", "pytest>=8")
REPO = Path(__file__).resolve().parent.parent


def venv_path() -> Path:
    return toolvenv.venvs_dir() / f"airflow-{AIRFLOW_VERSION}"


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
    base_stamp, project_stamp = ".batchinfer-base", ".batchinfer-project"
    base = json.dumps(
        {"requirements": BASE_REQUIREMENTS, "python": [sys.base_prefix, sys.version.split()[0]]}
    )
    project = json.dumps({"repo": str(REPO), "requirements": project_requirements()})
    with toolvenv.locked(venv):
        fresh = not toolvenv.is_stamped(venv, base_stamp, base)
        if fresh:
            started = time.monotonic()
            print(f"building {venv} ({', '.join(BASE_REQUIREMENTS)}), once", file=sys.stderr)
            toolvenv.create(venv, BASE_REQUIREMENTS)
            toolvenv.write_stamp(venv, base_stamp, base)
            print(f"  Airflow installed in {time.monotonic() - started:.0f}s", file=sys.stderr)
        if fresh or not toolvenv.is_stamped(venv, project_stamp, project):
            started = time.monotonic()
            (venv / project_stamp).unlink(missing_ok=True)
            toolvenv.run(toolvenv.pip(venv, "install", "-e", str(REPO)))
            # Airflow's pins and ours agree.
            toolvenv.run([str(toolvenv.python_of(venv)), "-m", "pip", "check"])
            toolvenv.write_stamp(venv, project_stamp, project)
            print(f"  batchinfer installed in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return toolvenv.python_of(venv)


def main() -> int:
    toolvenv.exit_on_sigterm()
    try:
        python = ensure()
    except toolvenv.SetupError as exc:
        print(f"error: the Airflow environment could not be built: {exc}", file=sys.stderr)
        return 2
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
