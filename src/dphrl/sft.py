"""Supervised fine-tuning stage (builds the demo's base model; usable on any causal LM).

The loss is the mean negative log-likelihood of the response tokens, EOS included, so the model
learns to stop; prompt tokens and padding carry no loss.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import get_scheduler

from dphrl.batching import pack, pad_token_id, response_logprobs
from dphrl.data.chat import encode_prompt
from dphrl.progress import progress_bar


def sft_train(
    model: torch.nn.Module,
    tokenizer,
    pairs: list[tuple[list[dict], str]],
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup_steps: int = 50,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 100,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train on (prompt messages, response text) pairs; returns the loss log (also passed to ``on_log``)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    pad = pad_token_id(tokenizer)
    encoded = [
        (encode_prompt(tokenizer, msgs), tokenizer(resp, add_special_tokens=False)["input_ids"] + [eos])
        for msgs, resp in pairs
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=warmup_steps, num_training_steps=steps)
    model.train()
    log, t0 = [], time.time()
    bar = progress_bar(range(steps), desc="sft", unit="step", disable=not progress)
    for step in bar:
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        packed = pack([p for p, _ in batch], [r for _, r in batch], pad)
        logp, _ = response_logprobs(model, packed)  # (B, T)
        loss = -(logp * packed.resp_mask).sum() / packed.resp_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "loss": float(loss.detach()), "seconds": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if on_log is not None:
                on_log(log[-1])
    model.eval()
    return log


def save_model(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained model + tokenizer: the result is an ordinary transformers checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
