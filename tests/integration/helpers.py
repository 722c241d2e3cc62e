"""Helpers for the end-to-end tests: run the real CLI, read the output layout back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

COMMON_WORDS = {
    "the", "a", "an", "is", "it", "and", "of", "to", "this", "with", "for", "in", "was",
    "positive", "negative", "mixed", "sentiment", "summary", "review", "product", "not", "but",
}  # fmt: skip


def cli(command: str, job: str | Path, *overrides: str) -> list[str]:
    """The argv of ``batchinfer <command> <job> --set ...``."""
    args = [sys.executable, "-m", "batch.cli", command, str(job)]
    for item in overrides:
        args += ["--set", item]
    return args


def submit(
    job: str | Path, *overrides: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """``batchinfer submit`` in a subprocess, as a user (or Airflow) would run it."""
    return subprocess.run(cli("submit", job, *overrides), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def run_together(
    *commands: list[str], timeout: float = 900
) -> list[subprocess.CompletedProcess[str]]:
    """Several CLI runs at once, each its own Ray session and engine, as two users' jobs on
    one machine would be. Engine starts are mostly single-threaded, so on the 2-core CI machine
    two of them overlap well: the suite shares the wait instead of paying it twice. A run
    still going after ``timeout`` is killed with its process group (its Ray session), and
    the others are still waited for."""
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
        for c in commands
    ]  # fmt: skip
    done: list[subprocess.CompletedProcess[str]] = []
    end = time.monotonic() + timeout
    try:
        for c, p in zip(commands, procs, strict=True):
            try:
                out, err = p.communicate(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
                err += f"\n(killed after {timeout:.0f}s)"
            done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return done


def read_parts(fs: Any, folder: str) -> pa.Table:
    paths = (
        sorted(p for p in fs.find(folder) if p.endswith(".parquet")) if fs.exists(folder) else []
    )
    tables = []
    for p in paths:
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables) if tables else pa.table({})


def read_json(fs: Any, path: str) -> dict[str, Any]:
    with fs.open(path, "rb") as fh:
        doc: dict[str, Any] = json.loads(fh.read())
    return doc


def looks_like_english(text: str) -> bool:
    """Real words, not token-id-0 garbage: letters, several words, a common one among them."""
    words = re.findall(r"[A-Za-z']+", text)
    letters = sum(c.isalpha() for c in text)
    return (
        len(words) >= 3
        and letters >= 0.6 * len(text.replace(" ", ""))
        and any(w.lower() in COMMON_WORDS for w in words)
    )


LEFTOVER = ("VLLM::", "ray::", "raylet", "gcs_server", "EngineCore")


def leftovers() -> list[str]:
    """Live engine or Ray processes (zombies hold nothing; they wait for their parent)."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    rows = [ln.split(None, 2) for ln in out.splitlines()[1:]]
    return [
        " ".join(r)
        for r in rows
        if len(r) == 3 and not r[1].startswith("Z") and any(k in r[2] for k in LEFTOVER)
    ]


def wait_for_no_leftovers(seconds: float = 30) -> list[str]:
    deadline = time.time() + seconds
    while leftovers() and time.time() < deadline:
        time.sleep(1)
    return leftovers()
