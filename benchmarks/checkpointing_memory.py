"""Peak memory of one training forward+backward with and without gradient checkpointing.

Each setting runs in its own process (peak RSS is per process, never lowered); the model is a
random-init Llama (~25M parameters, hidden 512, 8 layers) and the batch 16 sequences x 512 tokens, fp32
on CPU. Reports peak RSS above the process's RSS after building the model and batch, and the
forward+backward time. ``python benchmarks/checkpointing_memory.py [--seq 512 --batch 16]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(checkpointing: bool, seq: int, batch: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq)
    model = LlamaForCausalLM(cfg)
    if checkpointing:
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 8000, (batch, seq))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))
    return {"checkpointing": checkpointing, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "peak_above_start_mb": peak - base, "seconds": dt, "grad_norm": grad_norm}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one == "on", a.seq, a.batch)))
        return
    rows = []
    for mode in ("off", "on"):
        out = subprocess.run(
            [sys.executable, __file__, "--one", mode, "--seq", str(a.seq), "--batch", str(a.batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        "| gradient checkpointing | params | batch x seq | peak memory above start (MB) | fwd+bwd (s) | grad "
        "norm |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['checkpointing'] else 'off'} | {r['params_m']:.1f}M | {a.batch} x {a.seq} | "
              f"{r['peak_above_start_mb']:.0f} | {r['seconds']:.2f} | {r['grad_norm']:.6f} |")
    off, on = rows
    print(f"\nmemory saved: {1 - on['peak_above_start_mb'] / off['peak_above_start_mb']:.0%}; "
          f"time x{on['seconds'] / off['seconds']:.2f}")


if __name__ == "__main__":
    main()
