"""Update time of the two micro-batch plans on a real model: whole groups vs sequences sorted by length.

A real instruct model's groups mix responses cut at ``max_new_tokens`` with short ones, so a
whole-group micro-batch is as wide as its longest response. This times one forward + backward of
every micro-batch (the shared-prefix layout the trainer uses, LoRA on all linear layers, the loss a
plain token mean of the log-probs) for 4 prompts x 8 responses whose lengths are drawn like
SmolLM2-135M-Instruct's at temperature 0.5 with 128 new tokens (measured in the real-model experiment:
mean ~45-55 tokens, ~16 % cut at 128):

    python benchmarks/micro_batch_plan.py --model smollm2-135m-instruct --micro-batch 16

Prints one JSON line per plan (padded tokens forwarded, seconds) and the ratio. 1 thread by default.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=37)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--cut-frac", type=float, default=0.16)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dphrl.models import apply_lora, load_model
    from dphrl.prefix import (
        _by_length_plan,
        _whole_group_plan,
        pack_groups,
        plan_cost,
        prefix_response_logprobs,
    )

    rng = random.Random(args.seed)
    model = apply_lora(load_model(args.model), r=16, alpha=32)
    model.train()
    V = model.get_input_embeddings().weight.shape[0]
    prompts = [[rng.randrange(100, V) for _ in range(args.prompt_tokens)] for _ in range(args.groups)]
    seqs = []  # (group, response)
    for g in range(args.groups):
        for _ in range(args.group_size):
            n = args.max_new_tokens if rng.random() < args.cut_frac else rng.randint(5, 70)
            seqs.append((g, [rng.randrange(100, V) for _ in range(n)]))
    groups = [(args.prompt_tokens, [len(r) for gg, r in seqs if gg == g]) for g in range(args.groups)]
    index = [[i for i, (gg, _) in enumerate(seqs) if gg == g] for g in range(args.groups)]
    plans = {"whole groups": _whole_group_plan(groups, args.micro_batch),
             "by length": _by_length_plan(groups, args.micro_batch)}
    times = {name: float("inf") for name in plans}
    for _ in range(args.repeats):  # alternate the plans, so that a busy moment does not favour one
        for name, plan in plans.items():
            t0 = time.perf_counter()
            for mb in plan:
                rows = [index[g][i] for g, ix in mb for i in ix]
                batch = pack_groups([prompts[seqs[r][0]] for r in rows], [seqs[r][1] for r in rows], 0)
                logp, _ = prefix_response_logprobs(model, batch)  # (B, T)
                loss = -(logp * batch.resp_mask).sum() / batch.resp_mask.sum()
                loss.backward()
            model.zero_grad(set_to_none=True)
            times[name] = min(times[name], time.perf_counter() - t0)
    for name, plan in plans.items():
        print(json.dumps({"plan": name, "micro_batches": len(plan), "padded_tokens": plan_cost(groups, plan),
                          "real_tokens": sum(len(r) for _, r in seqs) + args.groups * args.prompt_tokens,
                          "seconds": round(times[name], 2)}), flush=True)
    print(json.dumps({"speedup": round(times["whole groups"] / times["by length"], 2)}))


if __name__ == "__main__":
    main()
