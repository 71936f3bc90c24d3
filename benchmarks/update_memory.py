"""Where one update micro-batch's memory goes on a real model: peak RSS and the largest allocations.

One micro-batch of the trainer's update (shared-prompt layout, :func:`dphrl.prefix.pack_groups`, the
log-prob head of :func:`dphrl.batching.token_logprobs`, a GRPO-shaped loss, backward) on
SmolLM2-135M-Instruct with LoRA r 16, fp32 on CPU, each setting in its own process (peak RSS is per
process and never lowered):

* ``default``: as the trainer runs it (entropy as a detached diagnostic, no checkpointing, the log-probs
  from the LM head in row chunks: ``chunked_head: true``, :mod:`dphrl.head`);
* ``materialized``: ``chunked_head: false``, the (B, T, V) fp32 logits held for backward;
* ``packed``: every sequence forwards its own prompt (``share_prefix: false``);
* ``checkpointing``: ``gradient_checkpointing: true`` (activations recomputed in backward; packed, as the
  trainer then runs: a checkpointed forward keeps no KV cache to share);
* ``no-entropy``: the entropy diagnostic off (what the diagnostic costs);
* ``profile``: the default under ``torch.profiler`` with ``profile_memory``: the operators whose
  outputs hold the most memory (self CPU memory: allocated minus freed inside the operator, summed
  over its calls; positive totals only), i.e. where the memory goes.

    python benchmarks/update_memory.py                        # 16 sequences, 2 prompts, 128 response tokens
    python benchmarks/update_memory.py --seqs 8 --resp 64
    python benchmarks/update_memory.py --model tiny           # the random tiny Llama (the suite's CPU test)

Peak RSS is reported above the process's RSS after the model, adapter and batch were built.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("default", "materialized", "packed", "checkpointing", "no-entropy", "profile")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(model_name: str, seqs: int, groups: int, prompt_len: int, resp_len: int, checkpointing: bool,
          shared: bool):
    """(LoRA model, batch of either layout, (B,) advantages) built deterministically."""
    import torch

    from dphrl.models import apply_lora
    from dphrl.prefix import pack_batch

    torch.manual_seed(0)
    if model_name == "tiny":
        from dphrl.data.tokenizer import build_char_tokenizer
        from dphrl.testing import tiny_causal_lm

        model = tiny_causal_lm(build_char_tokenizer(), max_positions=max(256, prompt_len + resp_len))
    else:
        from dphrl.models import load_model

        model = load_model(model_name)
    if checkpointing:
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
    model = apply_lora(model, r=16, alpha=32)
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(groups)]
    P = [prompts[i * groups // seqs] for i in range(seqs)]
    R = [torch.randint(3, vocab, (resp_len,), generator=g).tolist() for _ in range(seqs)]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batch = pack_batch(P, R, pad, shared)
    adv = torch.linspace(-1.0, 1.0, seqs)  # (B,)
    return model, batch, adv


def one(mode: str, a: argparse.Namespace) -> dict:
    """Build, then time and measure one forward + backward in ``mode``."""
    import torch

    from dphrl.prefix import batch_logprobs

    torch.set_num_threads(a.threads)
    shared = mode not in ("packed", "checkpointing")
    model, batch, adv = build(a.model, a.seqs, a.groups, a.prompt, a.resp, mode == "checkpointing", shared)
    start = _peak_mb()
    rss_start = _rss_mb()

    def step() -> float:
        logp, ent = batch_logprobs(model, batch, a.temperature, with_entropy=mode != "no-entropy",
                                   chunked=mode != "materialized")
        mask = batch.resp_mask  # (B, T)
        loss = -(logp * mask * adv.unsqueeze(1)).sum() / mask.sum()
        loss.backward()
        return float(loss)

    t = time.perf_counter()
    top: list[dict] = []
    if mode == "profile":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = step()
        rows = [e for e in prof.key_averages() if e.self_cpu_memory_usage > 0]
        rows.sort(key=lambda e: -e.self_cpu_memory_usage)
        top = [{"op": e.key, "mb": e.self_cpu_memory_usage / 2**20, "calls": e.count} for e in rows[: a.top]]
    else:
        loss = step()
    seconds = time.perf_counter() - t
    B, T = batch.resp_ids.shape
    prompt_rows = int(batch.prompt_ids.shape[0]) if shared else B
    return {
        "mode": mode, "seconds": seconds, "loss": loss, "rss_start_mb": rss_start,
        "peak_above_start_mb": _peak_mb() - max(start, rss_start), "seqs": B, "resp_len": T,
        "prompt_rows": prompt_rows, "prompt_len": a.prompt, "vocab": model.config.vocab_size,
        "logits_mb": B * T * model.config.vocab_size * 4 / 2**20, "top": top,
        "grad_norm": float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()
                                          if p.grad is not None))),
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model dphrl loads, or 'tiny'")
    p.add_argument("--seqs", type=int, default=16, help="sequences in the micro-batch (the recipe's 16)")
    p.add_argument("--groups", type=int, default=2, help="distinct prompts among them")
    p.add_argument("--prompt", type=int, default=48, help="prompt tokens")
    p.add_argument("--resp", type=int, default=128, help="response tokens (every row full: the worst case)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.5, help="the recipe's")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--top", type=int, default=12, help="operators listed by the profile")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse(argv)
    if a.one:
        print(json.dumps(one(a.one, a)))
        return []
    rows = []
    for mode in a.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", mode, "--model", a.model, "--seqs",
               str(a.seqs), "--groups", str(a.groups), "--prompt", str(a.prompt), "--resp", str(a.resp),
               "--threads", str(a.threads), "--top", str(a.top), "--temperature", str(a.temperature)]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONWARNINGS": "ignore"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r0 = rows[0]
    print(f"model {a.model} + LoRA r 16, fp32, {a.threads} thread(s); one micro-batch: {r0['seqs']} "
          f"sequences x {r0['resp_len']} response tokens, {a.groups} prompts x {r0['prompt_len']} tokens; "
          f"one (B, T, V) fp32 logits tensor = {r0['logits_mb']:.0f} MB")
    print("| mode | prompt rows forwarded | peak RSS above start MB | fwd+bwd s | grad norm |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['prompt_rows']} | {r['peak_above_start_mb']:.0f} | {r['seconds']:.2f} | "
              f"{r['grad_norm']:.6g} |")
    for r in rows:
        if r["top"]:
            print(f"\nlargest holders ({r['mode']}; torch.profiler self CPU memory = allocated - freed in "
                  "each operator):")
            print("| operator | MB held | calls |")
            print("|---|---|---|")
            for t in r["top"]:
                print(f"| {t['op']} | {t['mb']:.0f} | {t['calls']} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
