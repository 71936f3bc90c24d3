"""Model sizes and the memory one training process needs, without loading weights.

:func:`model_info` reads a model's size from a local ``config.json`` (meta-device model), the GGUF
cache, or :data:`KNOWN_MODELS` (hub ids that are not available offline); :func:`estimate_memory`
adds weights, gradients, optimizer state, activations and logits for a launch layout (formula in
its docstring and in ``docs/recipes.md``). ``dphrl train --dry-run`` prints both.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from dphrl.config import TrainConfig
from dphrl.launch import SHARDINGS

GiB = 2**30

# --------------------------------------------------------------------------------------------------
# Model sizes

#: Architectures of models the recipes use, for hub ids that are not available offline. Values are
#: the models' published ``config.json`` fields; parameter counts come from a meta-device model.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
    "Qwen/Qwen2.5-Math-7B": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}
KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M"] = KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]


@dataclass
class ModelInfo:
    """What the memory estimate needs to know about a model."""

    name: str
    source: str  # local | gguf | builtin | hub | unknown
    where: str  # how the size was found
    n_params: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int | None = None
    lora_params: dict[str, int] = field(default_factory=dict)  # target_modules spec -> trainable params

    @property
    def head_dim(self) -> int:
        return self.hidden // max(1, self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _norm(name: str) -> str:
    return Path(str(name)).name.lower()


def known_model(name: str) -> tuple[str, dict[str, Any]] | None:
    """The :data:`KNOWN_MODELS` entry whose name is a prefix of ``name``'s last path component (longest)."""
    n = _norm(name)
    hits = [(k, v) for k, v in KNOWN_MODELS.items() if n == k.lower() or n.startswith(_norm(k))]
    if not hits:
        return None
    return max(hits, key=lambda kv: len(_norm(kv[0])))


def _config_from_dict(d: dict[str, Any]):
    from transformers import AutoConfig

    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


@lru_cache(maxsize=32)
def _count_params(config_json: str, lora_r: int, lora_target_modules: str) -> tuple[int, int]:
    """(total params, LoRA params) of a model built on the meta device (no memory, no weights).

    ``torch.device("meta")`` rather than ``accelerate.init_empty_weights``: with transformers 5 the
    latter leaves tied input/output embeddings untied (SmolLM2-135M would count 163M, not 134.5M).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _config_from_dict(json.loads(config_json))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        lora = 0
        try:
            from peft import LoraConfig, get_peft_model

            targets: str | list[str] = lora_target_modules
            if "," in lora_target_modules:
                targets = [t.strip() for t in lora_target_modules.split(",") if t.strip()]
            peft_model = get_peft_model(
                model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=targets)
            )
            lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        except Exception:  # noqa: BLE001 - the formula below is a fine fallback
            lora = lora_param_formula(config, lora_r)
    return total, lora


def lora_param_formula(config: Any, r: int) -> int:
    """LoRA params of ``all-linear`` on a Llama-style block: r * (9h + 2 kv_dim + 3 I) per layer."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return r * (9 * h + 2 * kv + 3 * i) * layers


def _info_from_config(name: str, source: str, where: str, config: Any, cfg: TrainConfig) -> ModelInfo:
    d = config.to_dict()
    keep = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
            "head_dim", "attention_bias", "mlp_bias")
    small = {k: d[k] for k in keep if d.get(k) is not None}
    total, lora = _count_params(json.dumps(small, sort_keys=True), cfg.lora_r, cfg.lora_target_modules)
    return ModelInfo(
        name=name,
        source=source,
        where=where,
        n_params=total,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        vocab=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None),
        lora_params={cfg.lora_target_modules: lora},
    )


def model_info(cfg: TrainConfig, notes: list[str]) -> ModelInfo | None:
    """Resolve ``cfg.model`` and read its size without loading weights (None when unknown)."""
    from transformers import AutoConfig

    from dphrl.models import resolve_model

    name = cfg.model
    try:
        r = resolve_model(name)
    except (FileNotFoundError, ValueError, ImportError) as e:
        notes.append(f"MODEL NOT FOUND: {e}")
        r = None
    if r is not None and r.source == "local":
        cfgfile = Path(r.path) / "config.json"
        if cfgfile.is_file():
            return _info_from_config(
                name, "local", f"{cfgfile} (meta-device model)", AutoConfig.from_pretrained(r.path), cfg
            )
        notes.append(f"model dir {r.path} has no config.json (tokenizer only?)")
    if r is not None and r.is_gguf:
        from dphrl.models import gguf_cache_dir

        cached = gguf_cache_dir(r.gguf_file) / "model" / "config.json"
        if cached.is_file():
            return _info_from_config(name, r.source, f"GGUF cache {cached} (meta-device model)",
                                     AutoConfig.from_pretrained(cached.parent), cfg)
    hit = known_model(Path(r.gguf_file).name if r is not None and r.is_gguf else name)
    if hit is None and name in _builtin_names():
        hit = known_model(_builtin_display(name))
    if hit is not None:
        return _info_from_config(name, r.source if r else "unknown", f"known-model table ({hit[0]})",
                                 _config_from_dict(hit[1]), cfg)
    if r is not None and r.source == "hub":
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=True)
            return _info_from_config(name, "hub", "Hugging Face cache (offline)", config, cfg)
        except Exception as e:  # noqa: BLE001
            notes.append(
                f"model {name!r}: not in the local Hugging Face cache ({type(e).__name__}) and not in "
                f"dphrl.dryrun.KNOWN_MODELS; memory estimate skipped"
            )
            return None
    if r is not None and r.is_gguf:
        try:
            p = Path(r.gguf_file)
            config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
            return _info_from_config(name, r.source, f"GGUF metadata of {p.name}", config, cfg)
        except Exception as e:  # noqa: BLE001
            notes.append(f"model {name!r}: cannot read the GGUF metadata ({e}); memory estimate skipped")
    return None


def _builtin_names() -> list[str]:
    from dphrl.models import BUILTIN_MODELS

    return list(BUILTIN_MODELS)


def _builtin_display(name: str) -> str:
    from dphrl.models import BUILTIN_MODELS

    return BUILTIN_MODELS[name].filename


# --------------------------------------------------------------------------------------------------
# Memory



@dataclass
class MemoryEstimate:
    """Bytes per device, by component; ``total`` = static + max(training step, generation):
    rollouts and updates do not overlap in time."""

    weights: float
    grads: float
    optimizer: float
    autocast_copy: float
    reference_model: float
    activations: float
    logits: float
    kv_cache: float
    gen_scores: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.autocast_copy + self.reference_model

    @property
    def total(self) -> float:
        return self.static + max(self.activations + self.logits, self.kv_cache + self.gen_scores)

    def rows(self) -> list[tuple[str, float]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)] + [("total", self.total)]


#: Activation bytes saved per token and layer, in units of hidden_size, for a Llama/Qwen2 block
#: without gradient checkpointing: 2 RMSNorms (input + output: 4h), q, k, v (h + 2 kv_dim), the
#: attention output (h), and the SwiGLU MLP's gate, up, act(gate) and product (4 I).
def activation_factor(hidden: int, intermediate: int, kv_dim: int) -> float:
    return 6 + 2 * kv_dim / hidden + 4 * intermediate / hidden


# the model's logits, the fp32 temperature-scaled copy kept for backward, the entropy softmax
LOGIT_COPIES = 3


def estimate_memory(
    *,
    n_params: int,
    trainable_params: int,
    hidden: int,
    layers: int,
    intermediate: int,
    kv_dim: int,
    vocab: int,
    micro_batch_size: int,
    seq_len: int,
    response_len: int,
    generation_batch_size: int,
    bf16: bool,
    world_size: int = 1,
    sharding: str = "none",
    reference_copy: bool = False,
) -> MemoryEstimate:
    """Per-device memory of one training process (an estimate: no allocator slack, CUDA context or
    NCCL buffers, which add ~1-3 GiB on a GPU).

    S = world_size if sharding is fsdp/zero3 else 1; a = 2 bytes with bf16 autocast else 4.

    - weights:        n_params * 4 / S           (the trainer keeps fp32 weights; bf16 is autocast)
    - grads:          trainable * 4 / S
    - optimizer:      trainable * 8 / S          (AdamW exp_avg + exp_avg_sq, fp32)
    - autocast_copy:  trainable * 2 / S if bf16  (autocast caches a bf16 copy of weights that need grad)
    - reference_model: n_params * 4               (rkl without LoRA: a frozen fp32 copy, never sharded)
    - activations:    micro_batch * seq_len * hidden * layers * activation_factor * a
    - logits:         micro_batch * response_len * vocab * 4 * 3 (logits are kept for response tokens only)
    - kv_cache:       generation_batch * seq_len * layers * 2 * kv_dim * a   (during rollouts)
    - gen_scores:     generation_batch * vocab * 4 * 2  (one decoding step's fp32 scores and their
                      log-softmax: the HF engine records the sampled token's log-prob step by step)

    total = weights + grads + optimizer + autocast_copy + reference_model
            + max(activations + logits, kv_cache + gen_scores)
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    s = world_size if sharding in ("fsdp", "zero3") else 1
    a = 2 if bf16 else 4
    return MemoryEstimate(
        weights=n_params * 4 / s,
        grads=trainable_params * 4 / s,
        optimizer=trainable_params * 8 / s,
        autocast_copy=trainable_params * 2 / s if bf16 else 0.0,
        reference_model=n_params * 4 if reference_copy else 0.0,
        activations=micro_batch_size
        * seq_len
        * hidden
        * layers
        * activation_factor(hidden, intermediate, kv_dim)
        * a,
        logits=micro_batch_size * response_len * vocab * 4 * LOGIT_COPIES,
        kv_cache=generation_batch_size * seq_len * layers * 2 * kv_dim * a,
        gen_scores=generation_batch_size * vocab * 4 * 2,
    )


def memory_for(info: ModelInfo, cfg: TrainConfig, *, world_size: int, sharding: str) -> MemoryEstimate:
    trainable = info.lora_params.get(cfg.lora_target_modules, 0) if cfg.lora else info.n_params
    return estimate_memory(
        n_params=info.n_params, trainable_params=trainable, hidden=info.hidden, layers=info.layers,
        intermediate=info.intermediate, kv_dim=info.kv_dim, vocab=info.vocab,
        micro_batch_size=cfg.micro_batch_size, seq_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
        response_len=cfg.max_new_tokens, generation_batch_size=max(1, cfg.generation_batch_size),
        bf16=cfg.dtype == "bfloat16", world_size=world_size, sharding=sharding,
        reference_copy=cfg.spec().uses_live_reference(cfg.kl_coef) and not cfg.lora,
    )


def _fits(total: float) -> str:
    """Whether ``total`` bytes fit an 80 GiB (H100) / 141 GiB (H200) GPU with ~3 GiB to spare."""
    return "/".join("yes" if total + 3 * GiB <= cap * GiB else "no" for cap in (80, 141))


def _gib(x: float) -> str:
    return f"{x / GiB:,.2f} GiB"


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


