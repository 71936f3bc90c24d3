"""``dphrl demo``: diversity collapse and its cure, end to end on a laptop CPU.

Pipeline per seed: build a tiny base model from scratch (char tokenizer + Llama config + SFT on an
even mixture of styles) -> ``presample`` (split D_pef / D_exp, reference store) -> train grpo, dapo,
rkl, dph(forward_kl), dph(js) under the same budget, seed and data -> evaluate every model and the
base in domain (a+b) and out of domain (a-b) with n=16 -> one report (table, Pass@k curves, style
shares, mean ± std over seeds). ``--sweep`` adds the eta / kl_coef trade-off (Pass@1 vs Pass@16).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dphrl.config import TrainConfig
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.engines import build_engine
from dphrl.evaluation.runner import evaluate
from dphrl.models import load_model, load_tokenizer, tokenizer_hash
from dphrl.reference import presample
from dphrl.sft import save_model, sft_train
from dphrl.tasks import eval_hooks, styles
from dphrl.testing import tiny_causal_lm

#: grpo, rkl and both dph variants share one policy loss (GRPO's: clip 0.2/0.2, no dual clip,
#: seq-mean-token-mean), so that the divergence term is the only difference between them. With the
#: DAPO-style loss (clip-higher 0.28, token-mean, dual clip 3: the dph preset) every method forgets more
#: out of domain in this task (the ``--sweep`` ablation measures it); DAPO keeps its own loss recipe.
SHARED_LOSS = {"clip_high": 0.2, "loss_agg": "seq-mean-token-mean", "dual_clip": 0}
DAPO_STYLE_LOSS = {"clip_high": 0.28, "loss_agg": "token-mean", "dual_clip": 3.0}
IND, OOD = "add (in-domain)", "sub (out-of-domain)"


@dataclass
class DemoSize:
    """Every budget knob of the demo in one place (the report prints it)."""

    sft_steps: int = 1500
    sft_batch: int = 64
    hidden: int = 128
    layers: int = 4
    train_prompts: int = 400  # RL prompts (a+b, disjoint from the evaluation problems)
    eval_problems: int = 200  # per domain
    eval_n: int = 16
    presample_n: int = 8
    rl_steps: int = 100
    prompts_per_step: int = 32
    rollout_n: int = 8
    lr: float = 2e-4
    max_new_tokens: int = 28
    #: the reference's top-k stored per position (rehearsal_form topk); the vocabulary has 26 tokens
    store_topk: int = 8
    #: presample: prompts with at least this pass rate (of presample_n) go to D_pef
    split_threshold: float = 1.0
    #: Pass@k over training steps on the first problems of each domain (0 = off), main methods only
    eval_every: int = 25
    eval_during_problems: int = 48
    eval_during_n: int = 8
    methods: dict = field(
        default_factory=lambda: {
            "grpo": {"algorithm": "grpo", **SHARED_LOSS},
            "dapo": {"algorithm": "dapo"},
            "rkl": {"algorithm": "rkl", "kl_coef": 0.05, "kl_estimator": "k2", **SHARED_LOSS},
            "rkl-k3": {"algorithm": "rkl", "kl_coef": 0.05, "kl_estimator": "k3", **SHARED_LOSS},
            "dph-f": {"algorithm": "dph", "divergence": "forward_kl", "eta": 0.3, **SHARED_LOSS},
            "dph-js": {"algorithm": "dph", "divergence": "js", "eta": 1.0, **SHARED_LOSS},
            "dph-f-topk": {"algorithm": "dph", "divergence": "forward_kl", "eta": 0.3, "rehearsal_form": "topk",
                           "rehearsal_topk": 8, **SHARED_LOSS},
        }
    )
    #: every family at 4 coefficients (its main value + these 3)
    sweep: dict = field(
        default_factory=lambda: {
            "rkl": ("kl_coef", [0.01, 0.2, 1.0]),
            "rkl-k3": ("kl_coef", [0.01, 0.2, 1.0]),
            "dph-f": ("eta", [0.05, 0.1, 1.0]),
            "dph-js": ("eta", [0.2, 0.5, 3.0]),
            "dph-f-topk": ("eta", [0.05, 0.1, 1.0]),
        }
    )
    #: --ablation runs these: the main methods with the DAPO-style policy loss instead of the shared one
    ablation: dict = field(
        default_factory=lambda: {
            "grpo+dapo-loss": {"algorithm": "grpo", **DAPO_STYLE_LOSS},
            "rkl-k3+dapo-loss": {"algorithm": "rkl", "kl_coef": 0.05, "kl_estimator": "k3", **DAPO_STYLE_LOSS},
            "dph-f+dapo-loss": {"algorithm": "dph", "divergence": "forward_kl", "eta": 0.3, **DAPO_STYLE_LOSS},
        }
    )


FULL = DemoSize()
QUICK = replace(
    FULL, sft_steps=400, train_prompts=96, eval_problems=40, rl_steps=12, prompts_per_step=16,
    eval_every=6, eval_during_problems=16, split_threshold=0.5,  # the quick base model solves few prompts 8/8
    sweep={"rkl": ("kl_coef", [0.2]), "rkl-k3": ("kl_coef", [0.2]), "dph-f": ("eta", [1.0]), "dph-js": ("eta", [3.0]),
           "dph-f-topk": ("eta", [1.0])},
    ablation={"dph-f+dapo-loss": FULL.ablation["dph-f+dapo-loss"]},
)


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_base_model(out: Path, steps: int = 1500, seed: int = 0, size: DemoSize = FULL, progress: bool = False,
                     heartbeat: bool = False) -> Path:
    """Tokenizer + tiny Llama + SFT on an even mixture of styles for a+b and a-b; save_pretrained."""
    tok = build_char_tokenizer(styles.CHARS)
    model = tiny_causal_lm(tok, hidden=size.hidden, layers=size.layers, heads=4, max_positions=64, seed=seed)
    problems = styles.make_examples("add", "all") + styles.make_examples("sub", "all")
    pairs = styles.sft_pairs(problems, random.Random(seed))
    def beat(r: dict) -> None:
        if heartbeat and r["step"]:
            _say(f"seed {seed}: SFT step {r['step'] + 1}/{steps}, loss {r['loss']:.3f} ({r['seconds']:.0f} s)")

    log = sft_train(model, tok, pairs, steps=steps, batch_size=size.sft_batch, lr=3e-3, seed=seed, progress=progress,
                    log_every=max(1, steps // 4), on_log=beat)
    save_model(model, tok, out)
    (out / "sft_log.json").write_text(json.dumps(log))
    return out


def _eval_sets(size: DemoSize) -> dict[str, list]:
    return {
        "add (in-domain)": styles.make_examples("add", "test", limit=size.eval_problems),
        "sub (out-of-domain)": styles.make_examples("sub", "test", limit=size.eval_problems),
    }


def _evaluate(model, tok, size: DemoSize, out: Path, seed: int) -> dict:
    style_fn, answer_fn = eval_hooks("styles")  # the styles task's labels (dphrl.tasks.TASKS)
    return evaluate(
        build_engine("hf", model, tok, batch_size=256), tok, _eval_sets(size), styles.styles_reward, n=size.eval_n,
        max_new_tokens=size.max_new_tokens, seed=seed, out_dir=out, style_fn=style_fn,
        answer_fn=answer_fn, model_name=str(out), prompts_per_call=64, show_table=False,
        progress=False,
    )


def _train(base: Path, store: Path, out: Path, size: DemoSize, seed: int, overrides: dict,
           label: str = "", eval_during: bool = False) -> torch.nn.Module:
    from dphrl.trainer import Trainer

    def progress(trainer: Trainer, metrics: dict) -> None:
        """A line every quarter of the run (the jobs run in parallel processes, without bars)."""
        every = max(1, trainer.cfg.max_steps // 4)
        if label and trainer.step % every == 0 and trainer.step < trainer.cfg.max_steps:
            _say(f"{label}: step {trainer.step}/{trainer.cfg.max_steps}, rollout pass rate "
                 f"{metrics.get('reward/pass_rate', 0):.2f}, {metrics['time/step']:.1f} s/step")

    spec = {"type": "styles", "op": "add", "split": "train", "limit": size.train_prompts}
    evals = {}
    if eval_during and size.eval_every:  # Pass@k over training steps (the report plots it)
        n = size.eval_during_problems
        evals = dict(eval_every=size.eval_every, eval_n=size.eval_during_n, eval_data={
            IND: {"type": "styles", "op": "add", "split": "test", "limit": n},
            OOD: {"type": "styles", "op": "sub", "split": "test", "limit": n},
        })
    cfg = TrainConfig(
        model=str(base), dataset=spec, reward="styles", output_dir=str(out), seed=seed,
        reference_store=str(store), prompts_per_step=size.prompts_per_step, rollout_n=size.rollout_n,
        max_new_tokens=size.max_new_tokens, lr=size.lr, max_steps=size.rl_steps, micro_batch_size=64,
        generation_batch_size=256, progress=False, reward_workers=0, **evals, **overrides,
    )
    trainer = Trainer(cfg, callbacks=[progress], overwrite=True)  # an unfinished job restarts from scratch
    trainer.train()
    return trainer.acc.unwrap_model(trainer.model)


def _prepare_seed(root: Path, seed: int, size: DemoSize, threads: int = 1) -> str:
    """Base model (SFT) and reference store (presample) of one seed; skipped when already there.

    ``threads`` > 1 only when nothing else can run meanwhile (one seed: every job needs this base
    model), and only for SFT: its weights come out bitwise the same with 1 or 2 threads (checked),
    while presample's recorded log-probs moved by up to 3e-7 with 2 threads (same tokens), so the store
    is always made single-threaded, bitwise the one ``--seeds 3`` makes."""
    torch.set_num_threads(threads)
    t0 = time.time()
    sd = root / f"seed{seed}"
    base = sd / "base_model"
    if not (base / "config.json").exists():
        build_base_model(base, size.sft_steps, seed, size, heartbeat=True)
    store = sd / "store"
    torch.set_num_threads(1)
    if not (store / "manifest.json").exists():
        tok, model = load_tokenizer(str(base)), load_model(str(base))
        train = styles.make_examples("add", "train", limit=size.train_prompts)
        _say(f"seed {seed}: presample {size.presample_n} x {len(train)} prompts from the base model")
        presample(
            build_engine("hf", model, tok, batch_size=256), tok, train, styles.styles_reward, store, model_name=str(base),
            tokenizer_hash=tokenizer_hash(tok), n=size.presample_n, max_new_tokens=size.max_new_tokens,
            seed=seed, prompts_per_call=64, progress=False, reward_workers=0, topk=size.store_topk,
            threshold=size.split_threshold,
        )
    c = json.loads((store / "manifest.json").read_text())
    return (f"seed {seed}: base model + store ({time.time() - t0:.0f} s): D_pef {c['counts']['d_pef']} prompts, "
            f"D_exp {c['counts']['d_exp']}, {c['counts']['stored_samples']} stored samples, "
            f"base pass rate {c['mean_pass_rate']:.3f}")


def _job(name: str, kw: dict | None, base: Path, store: Path, out: Path, size: DemoSize, seed: int,
         eval_during: bool = False) -> str:
    """One demo job in its own process: train (unless ``kw`` is None: the base model) and evaluate.

    A job whose evaluation results exist is skipped, so an interrupted demo resumes where it stopped.
    """
    if (out / "eval" / "results.json").exists():
        return f"seed {seed}: {name} (already done)"
    torch.set_num_threads(1)
    t0 = time.time()
    if kw is None:
        tok, model = load_tokenizer(str(base)), load_model(str(base))
    else:
        tok = load_tokenizer(str(base))
        model = _train(base, store, out, size, seed, kw, label=f"seed {seed}: {name}", eval_during=eval_during)
    _evaluate(model, tok, size, out / "eval", seed)
    return f"seed {seed}: {name} ({time.time() - t0:.0f} s)"


def _seed_jobs(root: Path, seed: int, size: DemoSize, sweep: bool, ablation: bool = False
               ) -> tuple[dict[str, Path], list[tuple]]:
    """Run dirs and ``_job`` arguments of one seed (base evaluation + every method; the sweep and the
    policy-loss ablation if asked)."""
    sd = root / f"seed{seed}"
    jobs: list[tuple[str, dict | None]] = [("base", None)] + list(size.methods.items())
    if sweep:
        for name, (key, values) in size.sweep.items():
            jobs += [(f"{name}@{key}={v}", {**size.methods[name], key: v}) for v in values]
    if ablation:
        jobs += list(size.ablation.items())
    runs = {name: sd / "runs" / name for name, _ in jobs}
    args = [(name, kw, sd / "base_model", sd / "store", runs[name], size, seed, name in size.methods)
            for name, kw in jobs]
    return runs, args


def run_seeds(root: Path, seeds: int, size: DemoSize, sweep: bool, workers: int = 2, ablation: bool = False
              ) -> list[dict[str, Path]]:
    """All seeds in one pool of ``workers`` single-threaded processes (``sweep`` / ``ablation``: on every seed).

    A seed's base model (SFT) and reference store come first; its jobs (base evaluation, one training
    + evaluation per method) are queued as soon as they exist, so no worker waits for other seeds.
    For models this small, two single-threaded processes use two cores far better than one process
    with two threads (up to 10x when the cores are shared). Returns, per seed, run name -> run dir.
    """
    all_runs, per_seed = [], []
    for s in range(seeds):
        runs, args = _seed_jobs(root, s, size, sweep, ablation)
        all_runs.append(runs)
        per_seed.append(args)
    total = seeds + sum(len(a) for a in per_seed)
    _say(f"{seeds} seed(s), {total} jobs on {workers} worker process(es): per seed a base model (SFT, "
         f"{size.sft_steps} steps) + reference store (presample {size.presample_n} x {size.train_prompts}), "
         f"then training + evaluation of {', '.join(size.methods)}" + (" and the coefficient sweep" if sweep else "")
         + (" and the policy-loss ablation" if ablation else ""))
    done = 0
    if workers <= 1:
        for s in range(seeds):
            for fn, a in [(_prepare_seed, (root, s, size))] + [(_job, a) for a in per_seed[s]]:
                done += 1
                _say(f"done {done}/{total}: {fn(*a)}")
        return all_runs
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        # one seed: the other workers would idle during SFT, so it takes their cores as threads
        threads = min(workers, os.cpu_count() or 1) if seeds == 1 else 1
        pending = {pool.submit(_prepare_seed, root, s, size, threads): s for s in range(seeds)}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                seed = pending.pop(f)
                done += 1
                _say(f"done {done}/{total}: {f.result()}")
                if seed is not None:  # a seed is ready: queue its jobs
                    pending.update({pool.submit(_job, *a): None for a in per_seed[seed]})
    return all_runs



def _metric(run: Path, dataset: str, key: str, k: int | None = None) -> float:
    res = json.loads((run / "eval" / "results.json").read_text())["datasets"][dataset]
    if key == "pass":
        return res["pass@k"][str(k)]
    if key == "styles":
        return res["styles"]["effective_styles"]
    return res[key]


def answer_accuracy(run: Path, dataset: str) -> float:
    """Share of sampled responses whose final number is the right result, whatever their style.

    It separates the two ways Pass@k can fall: a model that narrows onto fewer styles keeps this high
    (its answers are right, the grader refuses the style), a model that lost the skill does not.
    """
    ok = n = 0
    with open(run / "eval" / "samples.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["dataset"] != dataset or r["index"] < 0:
                continue
            op, a, b = r["id"].split("-")
            truth = int(a) + int(b) if op == "add" else int(a) - int(b)
            ok += r.get("answer") == str(truth)
            n += 1
    return ok / max(1, n)


def _ms(xs: list[float]) -> tuple[float, float]:
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _row(runs: list[Path], K: int) -> dict[str, tuple[float, float]]:
    """Mean ± std over seeds of the numbers the claims are about, for one method's runs."""
    return {
        "pass@1": _ms([_metric(r, IND, "pass", 1) for r in runs]),
        f"pass@{K}": _ms([_metric(r, IND, "pass", K) for r in runs]),
        "styles": _ms([_metric(r, IND, "styles") for r in runs]),
        "ood pass@1": _ms([_metric(r, OOD, "pass", 1) for r in runs]),
        f"ood pass@{K}": _ms([_metric(r, OOD, "pass", K) for r in runs]),
        "ood answer acc": _ms([answer_accuracy(r, OOD) for r in runs]),
    }


def main_names(runs: dict[str, Path], size: DemoSize) -> list[str]:
    """The base model and the main methods (not the sweep points or the ablation)."""
    return [n for n in runs if n == "base" or n in size.methods]


def summarize(all_runs: list[dict[str, Path]], size: DemoSize) -> dict:
    """Mean ± std over seeds of the main table, the sweep and the ablation, and the claim checks."""
    K = size.eval_n
    names = main_names(all_runs[0], size)
    table = {n: _row([r[n] for r in all_runs], K) for n in names}
    extra = {n: _row([r[n] for r in all_runs], K) for n in all_runs[0] if n not in names}
    b = table["base"]
    pk = f"pass@{K}"

    def ood_loss(n: str) -> float:
        return b[f"ood {pk}"][0] - table[n][f"ood {pk}"][0]

    checks = {
        "RL works: pass@1 of every trained method > base": all(
            table[n]["pass@1"][0] > b["pass@1"][0] for n in names if n != "base"
        ),
    }
    if "grpo" not in table:  # the claims below compare with GRPO (and RKL)
        return {"seeds": len(all_runs), "table": table, "sweep": extra, "checks": checks}
    checks[f"collapse: GRPO {pk} >= 3 points below base"] = table["grpo"][pk][0] <= b[pk][0] - 0.03
    checks["collapse: GRPO effective styles <= half of base"] = table["grpo"]["styles"][0] <= b["styles"][0] / 2
    rkls = [r for r in ("rkl", "rkl-k3") if r in table]
    for d in [d for d in ("dph-f", "dph-js", "dph-f-topk") if d in table and rkls]:
        gap = table[d][pk][0] - table["grpo"][pk][0]
        std = max(table[d][pk][1], table["grpo"][pk][1])
        checks[f"cure: {d} {pk} >= GRPO + 3 points (gap {gap:+.3f}, std {std:.3f})"] = gap >= 0.03 and gap > std
        checks[f"cure: {d} keeps more styles than GRPO"] = table[d]["styles"][0] > table["grpo"]["styles"][0]
        checks[f"cure: {d} loses less out of domain ({pk}) than GRPO and {' and '.join(rkls)}"] = ood_loss(d) < min(
            ood_loss(n) for n in ["grpo", *rkls]
        )
    return {"seeds": len(all_runs), "table": table, "sweep": extra, "checks": checks,
            "matched": matched_frontier(all_runs, size)}


def _family_points(runs: dict[str, Path], size: DemoSize, fam: str) -> list[tuple[float, Path]]:
    """A family's runs of one seed, by coefficient: [(value, run dir)], sorted by value."""
    key, values = size.sweep[fam]
    names = {size.methods[fam][key]: fam} | {v: f"{fam}@{key}={v}" for v in values}
    return sorted((v, runs[n]) for v, n in names.items() if n in runs and runs[n].exists())  # without --sweep: 1


def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear interpolation of y at x through the points sorted by x (None outside their range)."""
    pts = sorted(points)
    if not pts or x < pts[0][0] - 1e-12 or x > pts[-1][0] + 1e-12:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1] if abs(x - pts[-1][0]) < 1e-12 else pts[0][1]


def matched_frontier(all_runs: list[dict[str, Path]], size: DemoSize, grid: int = 4) -> dict:
    """Pass@K in and out of domain of every swept family at matched in-domain Pass@1.

    Per seed, each family's 4 coefficients give 4 (Pass@1, Pass@K) points; Pass@K is interpolated
    linearly in Pass@1 at ``grid`` Pass@1 values spread over the range every family covers on every
    seed, then averaged over seeds (mean ± std). ``top_<dom>`` names the family with the highest mean,
    ``margin_<dom>`` its lead over the second, and ``clear_<dom>`` whether that lead exceeds the larger
    of the two families' seed std (else the two are within the seed-to-seed noise).
    """
    K = size.eval_n
    # a curve needs 2 coefficients on every seed (a demo without --sweep has 1: no comparison)
    fams = [f for f in size.sweep if all(len(_family_points(r, size, f)) >= 2 for r in all_runs)]
    if len(fams) < 2:
        return {}
    curves: dict[str, list[dict[str, list[tuple[float, float]]]]] = {}
    for fam in fams:
        curves[fam] = []
        for runs in all_runs:
            pts = _family_points(runs, size, fam)
            p1 = [_metric(r, IND, "pass", 1) for _, r in pts]
            curves[fam].append({"in": list(zip(p1, [_metric(r, IND, "pass", K) for _, r in pts])),
                                "ood": list(zip(p1, [_metric(r, OOD, "pass", K) for _, r in pts]))})
    lo = max(min(x for x, _ in c["in"]) for f in fams for c in curves[f])
    hi = min(max(x for x, _ in c["in"]) for f in fams for c in curves[f])
    if hi <= lo:
        return {"families": fams, "overlap": None}
    xs = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]
    out: dict = {"families": fams, "overlap": [lo, hi], "points": []}
    for x in xs:
        row: dict = {"pass@1": x}
        for dom in ("in", "ood"):
            vals = {f: _ms([_interp(c[dom], x) for c in curves[f]]) for f in fams}
            row[dom] = vals
            first, second = sorted(vals, key=lambda f: vals[f][0], reverse=True)[:2]
            row[f"top_{dom}"], row[f"second_{dom}"] = first, second
            row[f"margin_{dom}"] = vals[first][0] - vals[second][0]
            # one seed has no std to compare with: None
            row[f"clear_{dom}"] = (row[f"margin_{dom}"] > max(vals[first][1], vals[second][1])
                                   if len(all_runs) > 1 else None)
        out["points"].append(row)
    return out


def plot_frontier(summary: dict, size: DemoSize, path: Path) -> Path | None:
    """Pass@1 (in domain) against Pass@K in domain and out of domain, for the eta / kl_coef sweep
    (mean ± std over seeds), GRPO, DAPO and the base as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = size.eval_n
    rows = {**summary["table"], **summary["sweep"]}
    if not any("@" in n for n in rows):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, ykey, title in ((axes[0], f"pass@{K}", "in domain (a+b)"), (axes[1], f"ood pass@{K}", "out of domain (a-b)")):
        for fam, (key, values) in size.sweep.items():
            main_v = size.methods[fam][key]
            pts = sorted([(v, rows[f"{fam}@{key}={v}"]) for v in values] + [(main_v, rows[fam])], key=lambda t: t[0])
            xs = [p["pass@1"][0] for _, p in pts]
            ys = [p[ykey][0] for _, p in pts]
            line = ax.errorbar(xs, ys, xerr=[p["pass@1"][1] for _, p in pts], yerr=[p[ykey][1] for _, p in pts],
                               fmt="o-", capsize=2, label=f"{fam} ({key})")
            for (v, _), x, y in zip(pts, xs, ys):
                ax.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=line[0].get_color())
        for n, mk in [(n, mk) for n, mk in (("grpo", "s"), ("dapo", "D"), ("base", "*")) if n in rows]:
            p = rows[n]
            ax.errorbar([p["pass@1"][0]], [p[ykey][0]], xerr=[p["pass@1"][1]], yerr=[p[ykey][1]], fmt=mk,
                        markersize=11 if n == "base" else 8, color="black" if n == "base" else None, label=n)
        ax.set_xlabel("Pass@1 (in domain)")
        ax.set_ylabel(f"Pass@{K} ({title})")
        ax.set_title(f"Pass@1 vs Pass@{K}, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Divergence weight sweep: mean ± std over {summary['seeds']} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cells(row: dict) -> list[str]:
    return [f"{m:.2f} ± {s:.2f}" if k == "styles" else f"{m:.3f} ± {s:.3f}" for k, (m, s) in row.items()]


def _top_sentence(points: list[dict], dom: str) -> str:
    """One plain sentence: which family is on top at how many matched points, and whether clearly."""
    tops = [p[f"top_{dom}"] for p in points]
    best = max(set(tops), key=tops.count)
    clear = sum(1 for p in points if p[f"top_{dom}"] == best and p[f"clear_{dom}"])
    noise = ("one seed: no seed std to compare the lead with" if points[0][f"clear_{dom}"] is None else
             f"by more than the seed std at {clear} of them")
    return (f"{best} is on top at {tops.count(best)} of {len(points)} matched Pass@1 values, {noise}"
            + (f"; elsewhere {', '.join(sorted(set(tops) - {best}))}" if len(set(tops)) > 1 else "") + ".")


def _summary_md(summary: dict, size: DemoSize, seconds: float, frontier: Path | None) -> str:
    K = size.eval_n
    head = (f"| method | Pass@1 | Pass@{K} | effective styles | OOD Pass@1 | OOD Pass@{K} | OOD answer acc. |\n"
            "|---|---|---|---|---|---|---|")
    lines = [
        "# dphrl demo: diversity collapse and its cure",
        "",
        f"{summary['seeds']} seed(s); mean ± std over seeds; in domain = a+b (RL task), out of domain = a-b. "
        f"Wall time of this invocation {seconds / 60:.1f} min (a resumed demo skips finished jobs).",
        "",
        "How style validity arises: " + styles.VALIDITY_NOTE,
        "",
        "grpo, rkl (k2: the reverse-KL gradient), rkl-k3 (the paper's RKL baseline: a forward-KL gradient on "
        "rollouts), dph-f, dph-js and dph-f-topk (forward-KL over the reference's stored top-8 + tail) share one "
        "policy loss (clip 0.2/0.2, no dual clip, seq-mean-token-mean): "
        "the divergence term is the only difference. dapo uses its own recipe (clip-higher, token-mean, "
        "dynamic sampling, overlong shaping). OOD answer acc.: share of sampled a-b responses whose final "
        "number is right whatever the style (low = the skill itself was lost, not only the style mix).",
        "",
        head,
    ]
    lines += [f"| {n} | " + " | ".join(_cells(row)) + " |" for n, row in summary["table"].items()]
    lines += ["", "## Claims checked on these numbers", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {c}" for c, ok in summary["checks"].items()]
    matched = summary.get("matched") or {}
    if matched.get("points"):
        fams = matched["families"]
        lines += ["", f"## Which family lies on top at matched Pass@1 (Pass@{K}, mean ± std over seeds)", "",
                  f"Each family's 4 coefficients give a Pass@1-Pass@{K} curve per seed; Pass@{K} is interpolated at "
                  f"in-domain Pass@1 values inside the range every family covers on every seed "
                  f"([{matched['overlap'][0]:.3f}, {matched['overlap'][1]:.3f}]).", ""]
        for dom, title in (("in", "in domain"), ("ood", "out of domain")):
            lines += [f"**{title}**: " + _top_sentence(matched["points"], dom), "",
                      "| Pass@1 | " + " | ".join(fams) + " | on top (lead over 2nd) |",
                      "|---|" + "---|" * (len(fams) + 1)]
            for row in matched["points"]:
                cells = [f"{row[dom][f][0]:.3f} ± {row[dom][f][1]:.3f}" for f in fams]
                lead = f"{row[f'top_{dom}']} (+{row[f'margin_{dom}']:.3f} over {row[f'second_{dom}']}" + (
                    ", within seed std)" if row[f"clear_{dom}"] is False else ")")
                lines.append(f"| {row['pass@1']:.3f} | " + " | ".join(cells) + f" | {lead} |")
            lines.append("")
    elif matched:
        lines += ["", "The swept families' Pass@1 ranges do not overlap on every seed: no matched comparison."]
    if summary["sweep"]:
        lines += ["", "## Sweep (eta, kl_coef) and policy-loss ablation", "", head.replace("| method", "| run")]
        lines += [f"| {n} | " + " | ".join(_cells(row)) + " |" for n, row in summary["sweep"].items()]
    if frontier:
        lines += ["", f"![trade-off]({frontier.name})"]
    lines += ["", "## Budget", "", "```", json.dumps(asdict(size), indent=1), "```", ""]
    return "\n".join(lines)


class DemoBudgetError(ValueError):
    """A demo option or output directory that does not fit; the message says what to do."""


def demo_size(quick: bool = False, rl_steps: int | None = None, lr: float | None = None,
              methods: list[str] | None = None, train_prompts: int | None = None) -> DemoSize:
    """The budget of a demo run: FULL or QUICK, with optional RL steps / learning rate / method subset /
    number of training prompts (at most the 1,400 a+b training problems)."""
    size = QUICK if quick else FULL
    if train_prompts is not None:
        if not 1 <= train_prompts <= 1400:
            raise DemoBudgetError(f"--train-prompts must be in 1..1400 (the a+b training problems), got {train_prompts}")
        size = replace(size, train_prompts=train_prompts)
    if rl_steps is not None:
        size = replace(size, rl_steps=rl_steps)
    if lr is not None:
        size = replace(size, lr=lr)
    if methods:
        unknown = [m for m in methods if m not in size.methods]
        if unknown:
            raise DemoBudgetError(f"--methods: unknown {unknown}; choose from {sorted(size.methods)}")
        size = replace(size, methods={m: size.methods[m] for m in methods},
                       sweep={k: v for k, v in size.sweep.items() if k in methods})
    return size


def _check_budget(out: Path, size: DemoSize) -> None:
    """A resumed demo skips finished jobs: refuse an ``out`` dir that holds a demo with another budget."""
    f = out / "demo_size.json"
    now = asdict(size)
    if f.exists():
        old = json.loads(f.read_text())
        scalars = [k for k in now if k not in ("methods", "sweep", "ablation")]
        diff = [k for k in scalars if old.get(k) != now[k]]
        diff += [f"methods.{m}" for m in now["methods"] if m in old.get("methods", {}) and old["methods"][m] != now["methods"][m]]
        if diff:
            raise DemoBudgetError(f"{out} holds a demo run with another budget ({', '.join(diff)} differ); its finished "
                             "jobs would be reused. Pass another --out (or delete that directory).")
        now = {**old, **now, "methods": {**old.get("methods", {}), **now["methods"]}}
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(now, indent=1))


def run_demo(out: Path, quick: bool = False, seeds: int = 1, sweep: bool = False, workers: int = 2,
             size: DemoSize | None = None, ablation: bool = False) -> dict:
    """Run the whole demo and write ``out/report`` (report.md/html, PNGs, summary.json/md)."""
    from dphrl.evaluation.report import print_table, write_report

    size = size or (QUICK if quick else FULL)
    _check_budget(out, size)
    t0 = time.time()
    all_runs = run_seeds(out, seeds, size, sweep, workers, ablation)
    rep = out / "report"
    if rep.exists():
        shutil.rmtree(rep)
    mapping = {n: [r[n] for r in all_runs] for n in main_names(all_runs[0], size)}
    paths = write_report(mapping, rep, title="dphrl demo: diversity collapse and its cure")
    summary = summarize(all_runs, size)
    frontier = plot_frontier(summary, size, rep / "frontier.png")
    seconds = time.time() - t0
    (rep / "summary.json").write_text(json.dumps({**summary, "size": asdict(size), "seconds": seconds}, indent=1))
    (rep / "summary.md").write_text(_summary_md(summary, size, seconds, frontier))
    print_table(mapping)
    for c, ok in summary["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {c}")
    _say(f"done in {seconds / 60:.1f} min; report: {paths['html']} and {rep / 'summary.md'}")
    return summary
