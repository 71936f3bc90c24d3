"""One DPHGRPOTrainer optimizer step whose only gradient is the DPH reference term; its gradients.

Launched by ``tests/test_trl_integration.py`` as ``torchrun --standalone --nproc_per_node 2
tests/_trl_worker.py STORE OUT_DIR`` and also called in-process (1 process). The reward is 0 for every
rollout, so TRL's GRPO advantages, hence its policy-gradient, are exactly 0: the gradient seen before the
optimizer step is the reference term's alone, ``eta * grad(sum f(u_t) / N)`` over the whole reference
batch of the step. The policy is perturbed after construction (at the store's own weights every
divergence has zero gradient). Each rank saves its gradients, its reference forwards per micro-step and
the logged ``dph/*`` metrics to ``OUT_DIR/rank{r}_ga{ga}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from _ddp_worker import model, tokenizer  # noqa: E402  (the same tiny tokenizer and model)

from dphrl.data.example import Example  # noqa: E402
from dphrl.reference import ReferenceStore  # noqa: E402
from dphrl.rewards.registry import register_reward  # noqa: E402

DIVERGENCE, ETA = "forward_kl", 0.5
KEEP = (3, 2, 2, 1, 3, 2)  # stored samples kept per D_pef prompt: 13 in all, an odd count to pad
MODEL_NAME = "tiny-trl"


@register_reward("trl_toy")
def trl_toy(response: str, ex: Example) -> float:
    """1 when the first character is the answer; ``always`` prompts are always right (they form D_pef)."""
    return 1.0 if ex.answer == "always" else float(response[:1] == ex.answer)


@register_reward("trl_zero")
def trl_zero(response: str, ex: Example) -> float:
    """0 for everything: GRPO advantages are all 0, so TRL's own loss has zero gradient."""
    return 0.0


def examples() -> list[Example]:
    """12 prompts; the first 6 are always right (D_pef), the others want a leading '7' (D_exp)."""
    return [
        Example(
            id=f"t{i}",
            prompt=[{"role": "user", "content": f"{i}+{i}"}],
            answer="always" if i < 6 else "7",
            task="trl_toy",
        )
        for i in range(12)
    ]


def make_store(path: str | Path) -> dict:
    from dphrl.engines.hf import HFEngine
    from dphrl.models import tokenizer_hash
    from dphrl.reference import presample

    tok = tokenizer()
    return presample(
        HFEngine(model(tok), tok),
        tok,
        examples(),
        trl_toy,
        path,
        model_name=MODEL_NAME,
        tokenizer_hash=tokenizer_hash(tok),
        n=4,
        max_new_tokens=3,
        threshold=1.0,
        seed=0,
        progress=False,
    )


def trimmed_store(path: str | Path) -> ReferenceStore:
    """The store with ``KEEP[i]`` samples of the i-th D_pef prompt (uneven shards and padding)."""
    store = ReferenceStore(path)
    assert len(store.pef_ids) == len(KEEP), store.pef_ids
    for pid, k in zip(store.pef_ids, KEEP):
        store.samples[pid] = store.samples[pid][:k]
    return store


def perturb(net: torch.nn.Module) -> None:
    """Move the policy away from pi_ref (deterministically) so that the divergence has a gradient."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def one_step(store_path: str | Path, out_dir: str | Path, ga: int, loss_type: str = "dapo",
             gradient_checkpointing: bool = False, ref_batch_size: int | None = None) -> dict:
    """Build a DPHGRPOTrainer, perturb it, run one optimizer step; return grads, slices and metrics."""
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from dphrl.integrations.trl import DPHGRPOTrainer, trl_dataset, trl_reward

    tok = tokenizer()
    store = trimmed_store(store_path)
    args = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ga,
        num_generations=4,
        max_completion_length=3,
        max_steps=1,
        optim="sgd",
        learning_rate=0.1,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        top_k=0,
        seed=0,
        loss_type=loss_type,
        gradient_checkpointing=gradient_checkpointing,
    )
    grads: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.update(
                {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            )

    trainer = DPHGRPOTrainer(
        model(tok), trl_reward("trl_zero"), args, trl_dataset(examples(), store), processing_class=tok,
        reference_store=store, divergence=DIVERGENCE, eta=ETA, ref_prompts_per_step=len(KEEP),
        ref_batch_size=ref_batch_size, callbacks=[Capture()],
    )
    perturb(trainer.model)
    forwards: list[list[float]] = []  # per reference forward: the weights of its sequences
    inner = trainer.reference_loss

    def recording(net, items, num_tokens):
        forwards.append([w for _, w in items])
        return inner(net, items, num_tokens)

    trainer.reference_loss = recording
    trainer.train()
    logs = [h for h in trainer.state.log_history if "dph/div" in h]
    return {
        "world": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
        "grads": grads,
        "forwards": forwards,
        "micro_steps": trainer._step,
        "logs": logs,
        "ref_model_is_none": trainer.ref_model is None,
    }


def main(store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(out_dir)
    (out / f"started_rank{rank}").touch()
    for ga in (1, 2):
        res = one_step(store_path, out / f"run_ga{ga}", ga, gradient_checkpointing=ga == 2)
        torch.save(res, out / f"rank{rank}_ga{ga}.pt")
    if torch.distributed.is_initialized():  # a clean exit (gloo may abort at interpreter shutdown otherwise)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
