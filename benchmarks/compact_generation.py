"""``hf`` vs ``hf-compact`` generation on the same prompts: wall time, tokens, and the responses' length
spread (the compact engine's saving is batch x longest minus the sum of the lengths).

    python benchmarks/compact_generation.py --model smollm2-135m-instruct \\
        --data recipes/data/arith_add1d_test.jsonl --prompts 8 --n 8 --max-new-tokens 128 --temperature 0.5

Single-threaded by default (``--threads``), as the compare runner's workers are. Prints one JSON line per
engine and the speed-up; pass@1 of each (``number`` reward) should agree within sampling noise.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="recipes/data/arith_add1d_test.jsonl", help="JSONL with prompt/answer.")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dphrl.data import load_examples
    from dphrl.data.chat import encode_prompt
    from dphrl.engines import build_engine
    from dphrl.models import load_model, load_tokenizer
    from dphrl.rewards import get_reward

    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    exs = load_examples({"type": "jsonl", "path": args.data, "id_field": "id", "task": "math",
                         "limit": args.prompts})
    prompts = [encode_prompt(tok, e.prompt) for e in exs]
    reward = get_reward("number")
    times = {}
    for name in ("hf", "hf-compact"):
        engine = build_engine(name, model, tok, batch_size=args.batch_size)
        t0 = time.perf_counter()
        gens = engine.generate(prompts, args.n, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed)
        times[name] = time.perf_counter() - t0
        flat = [(e, g) for e, gs in zip(exs, gens) for g in gs]
        lengths = [len(g.response_ids) for _, g in flat]
        correct = [float(reward(g.text, e) >= 1.0) for e, g in flat]
        print(json.dumps({"engine": name, "seconds": round(times[name], 1), "sequences": len(flat),
                          "tokens": sum(lengths), "mean_length": round(sum(lengths) / len(lengths), 1),
                          "max_length": max(lengths), "truncated": sum(not g.finished for _, g in flat),
                          "pass@1": round(sum(correct) / len(correct), 3)}), flush=True)
    print(json.dumps({"speedup": round(times["hf"] / times["hf-compact"], 2)}))


if __name__ == "__main__":
    main()
