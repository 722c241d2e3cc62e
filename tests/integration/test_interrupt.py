"""Ctrl-C during a real run: exit 130, engines released, no vLLM or Ray process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from batch.demo import write_reviews
from tests.integration.helpers import leftovers, wait_for_no_leftovers


def test_ctrl_c_releases_engines_and_leaves_no_processes(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    assert wait_for_no_leftovers() == [], "a previous test left processes behind"
    inp = tmp_path / "reviews"
    write_reviews(inp, rows=64, files=1)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "batch.cli", "submit", "jobs/enrich.yaml",
            "--set", f"input.path={inp}", "--set", f"output.path={tmp_path / 'out'}",
            "--set", "resources.rows_per_chunk=4", "--set", "sampling.max_tokens=64",
            "--set", "response=null",  # plain text: this test is about Ctrl-C
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        # Wait until the engine is generating (the first chunk is committed), then Ctrl-C.
        assert proc.stdout is not None
        deadline = time.time() + 300
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line)["event"] == "progress":
                break
            assert time.time() < deadline, "no progress within 5 minutes"
        assert any("VLLM" in ln for ln in leftovers()), "the engine should be running now"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: engines released" in err
    assert wait_for_no_leftovers() == []
    # What was committed before the interrupt is kept, and only complete chunks are there.
    markers = list((tmp_path / "out" / "_markers").glob("*.json"))
    parts = list((tmp_path / "out" / "data").glob("*.parquet"))
    assert 1 <= len(markers) < 16
    assert len(parts) >= len(markers)
