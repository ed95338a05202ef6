"""The shipped testbed model loads offline and answers suite samples with the full cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from chunkkv.synthetic import generate_samples, score_sample  # noqa: E402

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "chunkkv-testbed"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="sdpa", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model.eval()
    return model, tokenizer


def test_folder_is_a_standard_hf_folder():
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 1024 * 1024


def test_architecture(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.hidden_act == "silu"  # SwiGLU MLP
    assert sum(p.numel() for p in model.parameters()) <= 5_000_000
    assert len(tokenizer) == cfg.vocab_size
    assert tokenizer.eos_token_id == cfg.eos_token_id


def test_tokenizer_round_trip(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text = generate_samples("niah_single", 1, 64, seed=0)[0].meta["needles"][0]
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize(
    "task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]
)
def test_answers_needle_tasks_full_cache(model_and_tokenizer, task):
    model, tokenizer = model_and_tokenizer
    sample = generate_samples(task, 1, 1024, seed=2024, tokenizer=tokenizer)[0]
    enc = tokenizer(sample.prompt, return_tensors="pt")
    n_target = len(tokenizer(sample.meta["target"], add_special_tokens=False).input_ids)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n_target, do_sample=False)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert score_sample(text, sample.answers) == 1.0, (text, sample.answers)
