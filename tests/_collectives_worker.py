"""Uneven shards on 2 processes under DDP, FSDP1 and FSDP2: every rank runs the same collectives.

Launched by ``tests/test_collectives.py`` as ``torchrun --standalone --nproc_per_node 2
tests/_collectives_worker.py STORE OUT_DIR``; also called in-process (1 process) as the reference.

For each sharding mode and each split of a fixed global batch (see ``SPLITS``: rank 0 holds most of
the rollouts and reference samples, or all of them, or rank 1 holds nothing at all) it runs one
``Trainer.optimizer_step`` with micro-batches of 2, so the ranks would run different numbers of
forward/backward passes without padding (under FSDP each is a collective: that hangs). The optimizer
is plain SGD (lr 0.5) so the updated weights show the gradient's scale exactly (Adam's first step
would not). The full weights after the update are saved to ``OUT_DIR/rank{r}.pt``.

It also runs DAPO's dynamic sampling with a scripted generator (informative or not by prompt id) and
records which prompt groups each rank kept: the kept set must be the one a single process keeps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _ddp_worker as base
import torch
from accelerate import Accelerator

from dphrl import sharding
from dphrl.config import TrainConfig
from dphrl.engines.base import Generation

MODES = ("ddp", "fsdp1", "fsdp2")
AGGS = ("token-mean", "seq-mean-token-mean")
N_REFS = 5
LR = 0.5


def split(name: str, rolls: list, refs: list, rank: int, world: int) -> tuple[list, list]:
    """This rank's share of the global batch under split ``name`` (1 process: everything)."""
    if world == 1:
        return rolls, refs
    g = base.GROUP_SIZE
    if name == "uneven":  # 3 groups vs 1, reference samples 3 vs 2: 5+2 vs 2+1 micro-batches of 2
        cut = 3 * g
        return (rolls[:cut], refs[0::2]) if rank == 0 else (rolls[cut:], refs[1::2])
    if name == "no_rollouts_on_rank1":  # DAPO kept no group there
        return (rolls, refs[0::2]) if rank == 0 else ([], refs[1::2])
    if name == "rank1_empty":  # an empty mini-batch on one rank
        return (rolls, refs) if rank == 0 else ([], [])
    raise ValueError(name)


SPLITS = ("uneven", "no_rollouts_on_rank1", "rank1_empty")


def _wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    from _fsdp_worker import wrap

    return wrap(model, mode)


def _sgd_prepare(acc: Accelerator, mode: str):
    """``accelerator.prepare`` replaced: wrap the model for ``mode`` and train it with SGD."""
    real = acc.prepare

    def prepare(model, _optimizer):
        if mode in ("fsdp1", "fsdp2") and acc.num_processes > 1:
            model = _wrap(model, mode)
            return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        model, _ = real(model, _optimizer)
        return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)

    return prepare


def _cfg(store: str, out: Path, agg: str, **kw) -> TrainConfig:
    return TrainConfig(
        model=base.MODEL_NAME, algorithm="dph", reward="ddp_toy", reference_store=str(store), loss_agg=agg,
        divergence="js", eta=0.5, prompts_per_step=base.GROUPS, rollout_n=base.GROUP_SIZE, max_new_tokens=5,
        micro_batch_size=2, lr=LR, max_grad_norm=0.0, progress=False, output_dir=str(out), engine="hf", **kw,
    )


def one_update(store: str, out: Path, acc: Accelerator, mode: str, agg: str, split_name: str) -> dict:
    from dphrl.trainer import Trainer

    tok = base.tokenizer()
    acc_prepare = acc.prepare
    acc.prepare = _sgd_prepare(acc, mode)
    try:
        trainer = Trainer(_cfg(store, out / f"{mode}_{agg}_{split_name}", agg), model=base.model(tok),
                          tokenizer=tok, examples=base.examples(), accelerator=acc)
    finally:
        acc.prepare = acc_prepare
    rolls, refs = base.global_batch(tok, base.model(tok))
    refs = (refs * 2)[:N_REFS]
    mine_r, mine_f = split(split_name, rolls, refs, acc.process_index, acc.num_processes)
    metrics = trainer.optimizer_step(mine_r, mine_f)
    weights = sharding.full_state_dict(trainer.model) if trainer.sharded else {
        k: v.detach().clone() for k, v in trainer._unwrapped().state_dict().items()
    }
    return {"weights": weights, "kind": sharding.sharding_kind(trainer.model), "metrics": metrics,
            "n": (len(mine_r), len(mine_f))}


def scripted_dapo(store: str, out: Path, acc: Accelerator) -> dict:
    """collect_rollouts with dynamic sampling over a scripted generator: which groups are kept."""
    from dphrl.trainer import Trainer

    tok = base.tokenizer()
    exs = base.examples() * 4  # 24 prompts with repeated ids: make them unique
    for i, ex in enumerate(exs):
        exs[i] = type(ex)(id=f"q{i}", prompt=[{"role": "user", "content": f"{i}+{i}"}], answer=ex.answer,
                          task=ex.task)
    cfg = TrainConfig(
        model=base.MODEL_NAME,
        algorithm="dapo",
        reward="ddp_toy",
        prompts_per_step=4,
        rollout_n=3,
        max_new_tokens=3,
        max_refill_rounds=4,
        progress=False,
        output_dir=str(out / "dapo"),
        engine="hf",
    )
    trainer = Trainer(cfg, model=base.model(tok), tokenizer=tok, examples=exs, accelerator=acc)
    informative = {ex.id: int(ex.id[1:]) % 2 == 0 for ex in exs}  # half the prompts have mixed rewards

    def fake(batch, step, round_):
        gens, rewards = [], []
        for ex in batch:
            ids = trainer.rollouts.encode(ex)
            gens.append([Generation(ids, [7, tok.eos_token_id], [-1.0, -1.0], ex.id, True) for _ in range(3)])
            rewards += [1.0, 0.0, 0.0] if informative[ex.id] else [0.0, 0.0, 0.0]
        lengths = torch.full((len(rewards),), 2.0)
        return gens, torch.tensor(rewards), lengths, 0

    trainer.rollouts.generate_and_score = fake
    kept = []
    for _ in range(3):  # three steps
        seqs, _ = trainer.collect_rollouts()
        kept.append(sorted({trainer_id(trainer, s) for s in seqs}))
    return {"kept": kept}


def trainer_id(trainer, seq) -> str:
    """The example id of a rollout (by its prompt ids)."""
    for ex in trainer.rollout_examples:
        if trainer.rollouts.encode(ex) == seq.prompt_ids:
            return ex.id
    raise KeyError(seq.prompt_ids)


def run(
    store: str, out_dir: str, accelerator: Accelerator | None = None, modes: tuple[str, ...] = MODES
) -> dict:
    torch.set_num_threads(1)
    acc = accelerator or Accelerator(cpu=True)
    out = Path(out_dir)
    (out / f"started_rank{acc.process_index}").touch()
    res: dict = {"world": acc.num_processes}
    for mode in modes:
        for agg in AGGS:
            for s in SPLITS:
                res[(mode, agg, s)] = one_update(store, out, acc, mode, agg, s)
    res["dapo"] = scripted_dapo(store, out, acc)
    if acc.num_processes > 1:
        torch.save(res, out / f"rank{acc.process_index}.pt")
    return res


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(sys.argv[1], sys.argv[2])
