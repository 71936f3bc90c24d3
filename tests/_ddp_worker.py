"""One optimizer update of a fixed global batch, sharded the way the Trainer shards it.

Launched by ``tests/test_distributed.py`` as ``torchrun --standalone --nproc_per_node 2
tests/_ddp_worker.py STORE OUT_DIR`` and also called in-process (1 process) as the reference. Each
rank takes its share of the batch -- rollouts by whole prompt groups (contiguous, as
``Trainer._local_prompts``), reference samples ``[rank::world]`` (as ``Trainer.reference_batch``) --
calls ``Trainer.optimizer_step`` and saves the synchronized gradients, the global grad norm and the
updated weights to ``OUT_DIR/rank{r}.pt``. No generation: the batch is built from a fixed seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from dphrl.batching import pack, response_logprobs
from dphrl.config import TrainConfig
from dphrl.data.chat import encode_prompt
from dphrl.data.example import Example
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.rewards.registry import register_reward
from dphrl.testing import tiny_causal_lm

AGGS = ("token-mean", "seq-mean-token-mean")
GROUPS, GROUP_SIZE, N_REFS = 4, 3, 7  # 7 reference samples: rank 0 gets 4, rank 1 gets 3
MODEL_NAME = "tiny-ddp"


@register_reward("ddp_toy")
def ddp_toy(response: str, ex: Example) -> float:
    if ex.answer == "any":  # always right: these prompts land in D_pef
        return 1.0
    return float(response[:1] != "" and response[:1] in ex.answer)


def tokenizer():
    return build_char_tokenizer("0123456789+")


def model(tok):
    return tiny_causal_lm(tok, hidden=32, layers=2, heads=4, seed=0)


def examples() -> list[Example]:
    return [
        Example(
            id=f"d{i}",
            prompt=[{"role": "user", "content": "7+" * (i + 1)}],
            answer="789" if i < 4 else "any",
            task="ddp_toy",
        )
        for i in range(6)
    ]


def make_store(path: str | Path) -> None:
    """A valid dph store for the Trainer constructor (its samples are not used here)."""
    from dphrl.engines.hf import HFEngine
    from dphrl.models import tokenizer_hash
    from dphrl.reference import presample

    tok = tokenizer()
    presample(
        HFEngine(model(tok), tok),
        tok,
        examples(),
        ddp_toy,
        path,
        model_name=MODEL_NAME,
        tokenizer_hash=tokenizer_hash(tok),
        n=4,
        max_new_tokens=3,
        threshold=1.0,
        keep_per_prompt=1,
        progress=False,
    )


def global_batch(tok, policy):
    """Deterministic rollouts (GROUPS x GROUP_SIZE) and reference samples of varying lengths."""
    from dphrl.trainer import Seq

    g = torch.Generator().manual_seed(1234)
    prompts = [encode_prompt(tok, ex.prompt) for ex in examples()]
    vocab, eos = len(tok), tok.eos_token_id

    def response():
        n = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(6, vocab, (n,), generator=g).tolist()
        if torch.rand(1, generator=g).item() < 0.5:
            ids[-1] = eos
        return ids

    rolls, refs = [], []
    for gi in range(GROUPS):
        for _ in range(GROUP_SIZE):
            rolls.append(Seq(prompts[gi], response(), advantage=float(torch.randn(1, generator=g))))
    for i in range(N_REFS):
        refs.append(Seq(prompts[(i % 2) + 4], response()))

    # log-probs near the policy's own, so that some ratios are clipped and most are not
    def near_policy(s):
        batch = pack([s.prompt_ids], [s.response_ids], tok.pad_token_id)
        with torch.no_grad():
            lp, _ = response_logprobs(policy, batch, 1.0)
        noise = (torch.rand(len(s.response_ids), generator=g) - 0.5) * 0.6
        return (lp[0, : len(s.response_ids)] + noise).tolist()

    for s in rolls:
        s.old_logp = near_policy(s)
    for s in refs:
        s.ref_logp = near_policy(s)
    return rolls, refs


def run(store: str | Path, out_dir: str | Path, accelerator: Accelerator | None = None) -> dict:
    from dphrl.trainer import Trainer

    torch.set_num_threads(1)
    acc = accelerator or Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    out_dir = Path(out_dir)
    (out_dir / f"started_rank{rank}").touch()
    tok = tokenizer()
    result: dict = {"world": world}
    for agg in AGGS:
        cfg = TrainConfig(
            model=MODEL_NAME,
            algorithm="dph",
            reward="ddp_toy",
            reference_store=str(store),
            loss_agg=agg,
            divergence="js",
            eta=0.5,
            prompts_per_step=GROUPS,
            rollout_n=GROUP_SIZE,
            max_new_tokens=5,
            micro_batch_size=3,
            lr=1e-5,
            max_grad_norm=1.0,
            progress=False,
            output_dir=str(out_dir / f"run_{agg}"),
        )
        policy = model(tok)
        trainer = Trainer(cfg, model=policy, tokenizer=tok, examples=examples(), accelerator=acc)
        if agg == AGGS[0]:  # the trainer's own sharding of prompts and stored reference samples
            result["local_prompts"] = [ex.id for ex in trainer.rollouts.local_prompts(GROUPS)]
            result["ref_batch"] = [
                (tuple(s.prompt_ids), tuple(s.response_ids)) for s in trainer.reference_batch()
            ]
        rolls, refs = global_batch(tok, trainer._unwrapped())
        per = GROUPS // world
        my_rolls = rolls[rank * per * GROUP_SIZE : (rank + 1) * per * GROUP_SIZE]
        my_refs = refs[rank::world]
        metrics = trainer.optimizer_step(my_rolls, my_refs)
        net = trainer._unwrapped()
        result[agg] = {
            "grads": {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None},
            "weights": {n: p.detach().clone() for n, p in net.named_parameters()},
            "grad_norm": metrics["grad_norm"],
            "skipped": metrics["update/nonfinite_skipped"],
            "n_rolls": len(my_rolls),
            "n_refs": len(my_refs),
        }
    # metrics with rank-dependent keys (a rank without reference samples has no div/* metrics)
    result["reduced"] = trainer.coll.reduce_metrics(
        {"a": float(rank), **({"only_rank0": 5.0} if rank == 0 else {})}
    )
    # the whole loop, with fewer stored reference samples than ranks (1 per step: one rank gets none)
    cfg = TrainConfig(
        model=MODEL_NAME,
        algorithm="dph",
        reward="ddp_toy",
        reference_store=str(store),
        ref_prompts_per_step=1,
        prompts_per_step=GROUPS,
        rollout_n=GROUP_SIZE,
        max_new_tokens=3,
        micro_batch_size=4,
        lr=1e-3,
        max_steps=2,
        save_every=1,
        progress=False,
        output_dir=str(out_dir / "train"),
    )
    trainer = Trainer(cfg, model=model(tok), tokenizer=tok, examples=examples(), accelerator=acc)
    result["train_last"] = trainer.train()  # ends with accelerate's end_training (process group gone)
    torch.save(result, out_dir / f"rank{rank}.pt")
    return result


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
