"""Generation, state dicts and weight gathering of a model sharded with torch FSDP, on 2 CPU processes.

Launched by ``tests/test_sharding.py`` as ``torchrun --standalone --nproc_per_node 2
tests/_fsdp_worker.py OUT_DIR KIND`` (KIND: fsdp1 | fsdp2). Each rank wraps the same tiny Llama,
generates for its own prompts (of different lengths, so the ranks would stop decoding at different
steps without ``synced_gpus``) inside :func:`dphrl.sharding.generation_context`, gathers the full
weights and state dict, round-trips a state dict, and saves what it saw to ``OUT_DIR/KIND_rank{r}.pt``.
The test compares all of it with the unsharded model in one process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dphrl import sharding
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.engines.hf import HFEngine
from dphrl.testing import tiny_causal_lm

SEED = 5


def tokenizer():
    return build_char_tokenizer("0123456789+")


def model(tok):
    """A tiny Llama whose (tied) EOS row points along its hidden states: EOS is sampled often, so
    responses end at different steps (the case ``synced_gpus`` exists for)."""
    m = tiny_causal_lm(tok, hidden=32, layers=2, heads=4, seed=SEED)
    with torch.no_grad():
        h = m.model(torch.tensor([prompts_for(1, tok)[1]])).last_hidden_state[0].mean(0)  # (H,)
        m.model.embed_tokens.weight[tok.eos_token_id] = h / h.norm() ** 2 * 2.0
    return m


def prompts_for(rank: int, tok) -> list[list[int]]:
    ids = [tok.convert_tokens_to_ids(c) for c in "12+34+5"]
    return [ids[: 2 + rank], ids[: 5 - rank]]  # rank-specific prompts


def generate(engine: HFEngine, prompts: list[list[int]]) -> dict:
    sampled = engine.generate(prompts, 3, max_new_tokens=6, temperature=0.9, seed=17)
    greedy = engine.generate(prompts, 1, max_new_tokens=6, greedy=True, seed=0)
    as_rows = lambda gens: [(g.response_ids, g.logprobs, g.finished) for gs in gens for g in gs]  # noqa: E731
    return {"sampled": as_rows(sampled), "greedy": as_rows(greedy)}


def wrap(m: torch.nn.Module, kind: str) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(m, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
                    device_id=torch.device("cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def main(out_dir: str, kind: str) -> None:
    import faulthandler

    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(out_dir)
    (out / f"started_{kind}_rank{rank}").touch()
    tok = tokenizer()
    wrapped = wrap(model(tok), kind)
    inner = wrapped.module if kind == "fsdp1" else wrapped
    res: dict = {"kind": sharding.sharding_kind(wrapped), "world": dist.get_world_size()}
    # elements held by this rank (FSDP2 parameters are DTensors: their own shard is to_local())
    res["local_numel"] = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() for p in wrapped.parameters()
    )
    engine = HFEngine(inner, tok, synced_gpus=True)
    with sharding.generation_context(wrapped):
        res["gen"] = generate(engine, prompts_for(rank, tok))
    with sharding.full_parameters(wrapped):
        res["full_numel"] = sum(p.numel() for p in inner.parameters())
    sd = sharding.full_state_dict(wrapped)
    res["state_dict"] = sd if rank == 0 else {}
    # round trip: perturb the sharded weights, load the full state dict back, read it again
    with torch.no_grad():
        for p in wrapped.parameters():
            p.add_(1.0)
    sharding.load_full_state_dict(wrapped, sd if rank == 0 else {})
    reloaded = sharding.full_state_dict(wrapped)
    res["reloaded"] = reloaded if rank == 0 else {}
    torch.save(res, out / f"{kind}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
