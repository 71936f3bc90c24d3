"""What sharded training (FSDP1, FSDP2) changes for generation and saving.

Under sharding each process holds a slice of every parameter, so the two places that use the whole
model outside a training forward need care:

* **generation** with Hugging Face ``generate``: FSDP1's root unit owns the embeddings, final norm
  and LM head as a flat sharded parameter that only its own forward gathers, so calling the inner
  model's ``generate`` needs those gathered first (``summon_full_params(recurse=False)``; the decoder
  layers, wrapped units of their own, gather themselves layer by layer). FSDP2 gathers in module
  hooks and needs nothing. In every sharded mode each forward is a collective, so every process
  must run the same number of decoding steps: ``synced_gpus=True`` (which :class:`HFEngine` passes).
* **weights for a separate engine** (vLLM) or a save: the full tensors, gathered on every rank
  (:func:`full_parameters`).

The kind of sharding is read from the model object itself (not from accelerate's state), so the same
code runs under ``accelerate launch`` and with raw ``torch.distributed.fsdp`` wrappers in the tests.
DeepSpeed ZeRO-3 is not handled here: the Trainer refuses DeepSpeed at start-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


def sharding_kind(model: torch.nn.Module) -> str:
    """"none" | "fsdp1" | "fsdp2" for a (possibly wrapped) model."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

        if isinstance(model, FSDP1) or any(isinstance(m, FSDP1) for m in model.modules()):
            return "fsdp1"
    except ImportError:  # torch built without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
            return "fsdp2"
    except ImportError:
        pass
    return "none"


def is_sharded(model: torch.nn.Module) -> bool:
    return sharding_kind(model) != "none"


def generation_context(model: torch.nn.Module):
    """Context in which the *unwrapped* model can run ``generate`` (with ``synced_gpus`` when sharded)."""
    kind = sharding_kind(model)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

        root = model if isinstance(model, FSDP1) else next(m for m in model.modules() if isinstance(m, FSDP1))
        return FSDP1.summon_full_params(root, recurse=False, writeback=False)
    return nullcontext()


@contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter gathered in full on every rank (read-only use: weight push, inspection)."""
    kind = sharding_kind(model)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

        with FSDP1.summon_full_params(model, recurse=True, writeback=False):
            yield
    elif kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for u in units:
            u.unshard()
        try:
            yield
        finally:
            for u in units:
                u.reshard()
    else:
        yield


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU, on rank 0 (other GPU ranks may get ``{}`` under FSDP).

    A collective under sharding: every rank must call it. Names are those of the inner model.
    """
    kind = sharding_kind(model)
    if kind != "none":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        on_gpu = any(p.device.type != "cpu" for p in model.parameters())
        # cpu_offload: rank 0 only, on the CPU (FSDP1's offload of CPU-resident parameters crashes, and
        # they are on the CPU already)
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_gpu))
        sd = {k: _full(v).detach().cpu().clone() for k, v in sd.items()}
    else:
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k.replace("_fsdp_wrapped_module.", ""): v for k, v in sd.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor -> the whole tensor


def load_full_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (as :func:`full_state_dict` returns; needed on rank 0 only under FSDP)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(  # a copy: torch replaces the dict's values by shards in place
            model, dict(state_dict), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
    else:
        model.load_state_dict(state_dict)
