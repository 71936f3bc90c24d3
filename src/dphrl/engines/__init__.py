"""Generation engines behind one interface, built by one factory.

``build_engine(name, model, tokenizer, **opts)`` is the only place an engine is constructed (trainer,
``presample``, ``eval``, the demo). ``name`` is a registered engine (``hf``: Hugging Face
``generate``; ``vllm``: colocated vLLM, imported lazily), ``auto`` (vllm where it can run: installed
and a CUDA GPU visible; else hf), or ``package.module:factory`` for your own. ``auto`` is resolved
here at run time, never written into a config; the trainer records what it became in the run's
``run_info.json``.

Register an engine with ``@ENGINES.register("name")`` on a factory
``factory(model, tokenizer, **opts) -> Engine``; ``opts`` are those of :func:`build_engine` (a
factory takes what it needs and ignores the rest). Declare what it needs and can do with
``@with_capabilities(...)`` (:class:`EngineCapabilities`): nothing outside this package compares
engine names, so a new engine is this one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dphrl.engines.base import Engine, EngineCapabilities, Generation
from dphrl.registry import Registry

__all__ = ["ENGINES", "Engine", "EngineCapabilities", "Generation", "build_engine", "engine_capabilities",
           "resolve_engine", "with_capabilities"]

#: Engine factories by config name (config key ``engine``; ``auto`` picks one of them).
ENGINES: Registry[Any] = Registry("engine", config_key="engine")


def with_capabilities(**caps: bool) -> Callable[[Callable[..., Engine]], Callable[..., Engine]]:
    """Decorator: declare an engine factory's :class:`EngineCapabilities` (``uses_policy_module``,
    ``exact_logprobs``, ``needs_model``)."""

    def deco(factory: Callable[..., Engine]) -> Callable[..., Engine]:
        factory.capabilities = EngineCapabilities(**caps)  # type: ignore[attr-defined]
        return factory

    return deco


@ENGINES.register("hf")
@with_capabilities(uses_policy_module=True, exact_logprobs=True, needs_model=True)
def _hf_engine(model: Any, tokenizer: Any, *, batch_size: int = 64, synced_gpus: bool = False,
               share_prefix: bool = True, kv_budget_mb: float | None = None, **_: Any) -> Engine:
    """Hugging Face ``generate`` on ``model`` (the policy itself during training: no copy); ``share_prefix``
    prefills each distinct prompt of a batch once."""
    from dphrl.engines.hf import HFEngine

    if model is None:
        raise ValueError("engine 'hf' needs the model object")
    return HFEngine(model, tokenizer, batch_size=batch_size, synced_gpus=synced_gpus,
                    share_prefix=share_prefix, kv_budget_mb=kv_budget_mb)


@ENGINES.register("hf-compact")
@with_capabilities(uses_policy_module=True, exact_logprobs=True, needs_model=True)
def _hf_compact_engine(model: Any, tokenizer: Any, *, batch_size: int = 64, synced_gpus: bool = False,
                       share_prefix: bool = True, kv_budget_mb: float | None = None, **_: Any) -> Engine:
    """``hf`` whose decoding drops the rows that have ended (faster when response lengths vary; same
    distribution, another random stream than ``hf`` for the same seed)."""
    from dphrl.engines.compact import CompactHFEngine

    if model is None:
        raise ValueError("engine 'hf-compact' needs the model object")
    return CompactHFEngine(model, tokenizer, batch_size=batch_size, synced_gpus=synced_gpus,
                           share_prefix=share_prefix, kv_budget_mb=kv_budget_mb)


@ENGINES.register("vllm")
@with_capabilities(uses_policy_module=False, exact_logprobs=False, needs_model=False)
def _vllm_engine(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str = "",
    dtype: str = "bfloat16",
    seed: int = 0,
    gpu_memory_utilization: float = 0.3,
    max_model_len: int | None = None,
    distributed: bool = False,
    **_: Any,
) -> Engine:
    """Colocated vLLM reading the model named ``model_name`` (GGUF / built-in: their safetensors cache)."""
    from dphrl.engines.vllm import VLLMEngine

    if not model_name:
        raise ValueError("engine 'vllm' needs model_name (a local dir, hub id, .gguf file or built-in name)")
    return VLLMEngine.from_model(model_name, tokenizer, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                 gpu_memory_utilization=gpu_memory_utilization, distributed=distributed)


def resolve_engine(name: str) -> str:
    """``auto`` -> ``vllm`` where vLLM can run here (installed, CUDA GPU), else ``hf``; others unchanged
    (an unknown name raises, listing the valid ones)."""
    if name == "auto":
        from dphrl.engines import vllm

        return "vllm" if vllm.vllm_available() else "hf"
    ENGINES.get(name)
    return name


def engine_capabilities(name: str) -> EngineCapabilities:
    """What the engine ``name`` (``auto`` resolved here) needs and can do; defaults for a factory that
    declares nothing."""
    caps = getattr(ENGINES.get(resolve_engine(name)), "capabilities", None)
    return caps if isinstance(caps, EngineCapabilities) else EngineCapabilities()


def build_engine(name: str, model: Any, tokenizer: Any, **opts: Any) -> Engine:
    """The engine ``name`` (``auto`` resolved here) for ``model`` / ``tokenizer``.

    ``opts``: ``batch_size``, ``synced_gpus``, ``share_prefix``, ``kv_budget_mb`` (hf, hf-compact);
    ``model_name``, ``dtype``, ``seed``,
    ``gpu_memory_utilization``, ``max_model_len``, ``distributed`` (vllm).
    """
    return ENGINES.get(resolve_engine(name))(model, tokenizer, **opts)
