"""Imports stay light: `import batch` and `batchinfer --help` load neither vllm nor torch."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("vllm", "torch", "ray", "transformers")


def loaded_after(code: str) -> set[str]:
    probe = (
        f"{code}\nimport sys\nprint('LOADED:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("LOADED:"))
    return {m for m in line.removeprefix("LOADED:").split(",") if m}


def test_import_batch_and_pipelines_is_light() -> None:
    assert loaded_after("import batch, batch.spec, batch.engine, pipelines") == set()


def test_cli_help_is_light_and_teaches() -> None:
    code = (
        "import sys\nfrom batch.cli import app\nsys.argv=['batchinfer','--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass"
    )
    assert loaded_after(code) == set()
    out = subprocess.run(
        [sys.executable, "-m", "batch.cli", "submit", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "--set" in out.stdout and "resume" in out.stdout
