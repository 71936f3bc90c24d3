"""Sample SmolLM2-135M-Instruct (or any dphrl model) on arithmetic jsonl prompts and score the responses.

One model load serves every temperature. ``--truncate K`` also scores the first K tokens of every
sample as a sample with ``max_new_tokens=K`` (exact: the first K tokens of an ancestral sample are
distributed as a K-token sample; a response longer than K is then cut). Writes one JSON record per
response and setting (``--out``, appended chunk by chunk, so a stopped run keeps what it sampled;
``--start`` resumes) and prints, per setting: pass rate under the ``number`` reward, the fraction of
responses cut at ``max_new_tokens``, and how many prompts reach a pass rate ≥ 0.75 (6/8) and
≥ 0.625 (5/8), i.e. the D_pef sizes that ``presample`` would find at those ``split_threshold`` values.
``--summary FILE`` prints the same table from records written before, re-scored with the current
reward, without a model.

Run from the repository root, one model process at a time on a shared CPU, e.g.::

    OMP_NUM_THREADS=1 .venv/bin/python recipes/data/sample_arith.py recipes/data/arith_add1d_train.jsonl \\
        --shuffle 0 --limit 40 --n 8 --temperatures 0.7 --max-new-tokens 64 --truncate 32 \\
        --out runs/probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

from dphrl.data.example import Example
from dphrl.rewards.math import number_reward


def _rows(paths: list[str], start: int, limit: int | None, shuffle_seed: int | None) -> list[dict]:
    rows = []
    for p in paths:
        part = [json.loads(ln) for ln in Path(p).read_text().splitlines() if ln.strip()]
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(part)
        rows += part[start : start + limit] if limit else part[start:]
    return rows


def summarize(records: list[dict]) -> None:
    """Per (temperature, max_new_tokens): pass rate, cut fraction, prompts with >= 6/8 and >= 5/8 correct."""
    by: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[(r["temperature"], r["max_new_tokens"])][r["id"]].append(r)
    for (temp, mnt), groups in sorted(by.items()):
        n = sum(len(g) for g in groups.values())
        ok = sum(r["reward"] >= 1.0 for g in groups.values() for r in g)
        cut = sum(not r["finished"] for g in groups.values() for r in g)
        rates = [sum(r["reward"] >= 1.0 for r in g) / len(g) for g in groups.values()]
        print(
            f"T={temp} max_new_tokens={mnt}: {len(groups)} prompts x {n // max(len(groups), 1)}: "
            f"pass {ok / n:.3f} ({ok}/{n}), cut {cut / n:.3f}, "
            f"prompts >= 0.75: {sum(x >= 0.75 for x in rates)}, "
            f">= 0.625: {sum(x >= 0.625 for x in rates)}, any correct: {sum(x > 0 for x in rates)}, "
            f"all correct: {sum(x == 1.0 for x in rates)}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="*", help="jsonl files with id / prompt / answer")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument(
        "--start", type=int, default=0, help="skip the first N prompts of each file (after --shuffle)"
    )
    ap.add_argument("--limit", type=int, default=None, help="then take N prompts of each file")
    ap.add_argument("--shuffle", type=int, default=None, help="shuffle each file with this seed first")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--truncate", type=int, nargs="*", default=[], help="also score the first K tokens (K < max)"
    )
    ap.add_argument(
        "--chunk", type=int, default=8, help="prompts per generate call (records written after each)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="jsonl of every response (appended)")
    ap.add_argument("--summary", default=None, help="only summarize this records file")
    args = ap.parse_args()
    if args.summary:
        records = [json.loads(ln) for ln in Path(args.summary).read_text().splitlines() if ln.strip()]
        for r in records:  # re-scored with the current reward
            ex = Example(id=r["id"], prompt=[{"role": "user", "content": r["prompt"]}], answer=r["answer"])
            r["reward"] = number_reward(r["response"], ex)
        summarize(records)
        return

    from dphrl.data.chat import encode_prompt
    from dphrl.engines import build_engine
    from dphrl.models import load_model, load_tokenizer

    rows = _rows(args.data, args.start, args.limit, args.shuffle)
    t0 = time.time()
    tok = load_tokenizer(args.model)
    model = load_model(args.model)
    engine = build_engine("hf", model, tok, batch_size=args.batch_size)
    print(f"loaded {args.model} in {time.time() - t0:.0f}s; {len(rows)} prompts", flush=True)
    lengths = sorted({args.max_new_tokens, *[k for k in args.truncate if k < args.max_new_tokens]})
    records: list[dict] = []
    for temp in args.temperatures:
        for c0 in range(0, len(rows), args.chunk):
            chunk = rows[c0 : c0 + args.chunk]
            t1 = time.time()
            prompts = [encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in chunk]
            gens = engine.generate(
                prompts,
                args.n,
                max_new_tokens=args.max_new_tokens,
                temperature=temp,
                seed=args.seed + args.start + c0,
            )
            out = []
            for r, group in zip(chunk, gens):
                ex = Example(
                    id=r["id"], prompt=[{"role": "user", "content": r["prompt"]}], answer=str(r["answer"])
                )
                for g in group:
                    for k in lengths:
                        if len(g.response_ids) <= k:
                            text, finished, n_tok = g.text, g.finished, len(g.response_ids)
                        else:
                            text = tok.decode(g.response_ids[:k], skip_special_tokens=True)
                            finished, n_tok = False, k
                        out.append(
                            {
                                "id": r["id"],
                                "prompt": r["prompt"],
                                "answer": str(r["answer"]),
                                "temperature": temp,
                                "max_new_tokens": k,
                                "finished": finished,
                                "n_tokens": n_tok,
                                "reward": number_reward(text, ex),
                                "response": text,
                            }
                        )
            records += out
            if args.out:
                with open(args.out, "a") as f:
                    f.write("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
            print(
                f"T={temp} prompts {args.start + c0}-{args.start + c0 + len(chunk) - 1} "
                f"[{time.time() - t1:.0f}s]",
                flush=True,
            )
    summarize(records)


if __name__ == "__main__":
    main()
