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
from dphrl.engines.hf import HFEngine
from dphrl.evaluation.runner import evaluate
from dphrl.models import load_model, load_tokenizer, tokenizer_hash
from dphrl.reference import presample
from dphrl.sft import save_model, sft_train
from dphrl.tasks import styles
from dphrl.testing import tiny_causal_lm


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
    methods: dict = field(
        default_factory=lambda: {
            "grpo": {"algorithm": "grpo"},
            "dapo": {"algorithm": "dapo"},
            "rkl": {"algorithm": "rkl", "kl_coef": 0.05},
            "dph-f": {"algorithm": "dph", "divergence": "forward_kl", "eta": 0.3},
            "dph-js": {"algorithm": "dph", "divergence": "js", "eta": 1.0},
        }
    )
    sweep: dict = field(
        default_factory=lambda: {
            "dph-f": ("eta", [0.05, 0.1, 1.0]),
            "dph-js": ("eta", [0.2, 0.5, 3.0]),
            "rkl": ("kl_coef", [0.01, 0.2, 1.0]),
        }
    )


FULL = DemoSize()
QUICK = replace(
    FULL, sft_steps=400, train_prompts=96, eval_problems=40, rl_steps=12, prompts_per_step=16,
)


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_base_model(out: Path, steps: int = 1500, seed: int = 0, size: DemoSize = FULL, progress: bool = False) -> Path:
    """Tokenizer + tiny Llama + SFT on an even mixture of styles for a+b and a-b; save_pretrained."""
    tok = build_char_tokenizer(styles.CHARS)
    model = tiny_causal_lm(tok, hidden=size.hidden, layers=size.layers, heads=4, max_positions=64, seed=seed)
    problems = styles.make_examples("add", "all") + styles.make_examples("sub", "all")
    pairs = styles.sft_pairs(problems, random.Random(seed))
    log = sft_train(model, tok, pairs, steps=steps, batch_size=size.sft_batch, lr=3e-3, seed=seed, progress=progress)
    save_model(model, tok, out)
    (out / "sft_log.json").write_text(json.dumps(log))
    return out


def _eval_sets(size: DemoSize) -> dict[str, list]:
    return {
        "add (in-domain)": styles.make_examples("add", "test", limit=size.eval_problems),
        "sub (out-of-domain)": styles.make_examples("sub", "test", limit=size.eval_problems),
    }


def _evaluate(model, tok, size: DemoSize, out: Path, seed: int, domains: tuple[str, ...] | None = None) -> dict:
    sets = _eval_sets(size)
    if domains:
        sets = {k: v for k, v in sets.items() if k in domains}
    return evaluate(
        HFEngine(model, tok, batch_size=256), tok, sets, styles.styles_reward, n=size.eval_n,
        max_new_tokens=size.max_new_tokens, seed=seed, out_dir=out, style_fn=styles.style_of,
        answer_fn=styles.final_answer, model_name=str(out), prompts_per_call=64, show_table=False,
        progress=False,
    )


def _train(base: Path, store: Path, out: Path, size: DemoSize, seed: int, overrides: dict) -> torch.nn.Module:
    from dphrl.trainer import Trainer

    spec = {"type": "styles", "op": "add", "split": "train", "limit": size.train_prompts}
    cfg = TrainConfig(
        model=str(base), dataset=spec, reward="styles", output_dir=str(out), seed=seed,
        reference_store=str(store), prompts_per_step=size.prompts_per_step, rollout_n=size.rollout_n,
        max_new_tokens=size.max_new_tokens, lr=size.lr, max_steps=size.rl_steps, micro_batch_size=64,
        generation_batch_size=256, progress=False, **overrides,
    )
    trainer = Trainer(cfg)
    trainer.train()
    return trainer.acc.unwrap_model(trainer.model)


def _prepare_seed(root: Path, seed: int, size: DemoSize) -> str:
    """Base model (SFT) and reference store (presample) of one seed; skipped when already there."""
    torch.set_num_threads(1)
    t0 = time.time()
    sd = root / f"seed{seed}"
    base = sd / "base_model"
    if not (base / "config.json").exists():
        build_base_model(base, size.sft_steps, seed, size)
    store = sd / "store"
    if not (store / "manifest.json").exists():
        tok, model = load_tokenizer(str(base)), load_model(str(base))
        train = styles.make_examples("add", "train", limit=size.train_prompts)
        presample(
            HFEngine(model, tok, batch_size=256), tok, train, styles.styles_reward, store, model_name=str(base),
            tokenizer_hash=tokenizer_hash(tok), n=size.presample_n, max_new_tokens=size.max_new_tokens,
            seed=seed, prompts_per_call=64, progress=False,
        )
    c = json.loads((store / "manifest.json").read_text())
    return (f"seed {seed}: base model + store ({time.time() - t0:.0f} s): D_pef {c['counts']['d_pef']} prompts, "
            f"D_exp {c['counts']['d_exp']}, {c['counts']['stored_samples']} stored samples, "
            f"base pass rate {c['mean_pass_rate']:.3f}")


def _job(name: str, kw: dict | None, base: Path, store: Path, out: Path, size: DemoSize, seed: int,
         domains: tuple[str, ...] | None) -> str:
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
        model = _train(base, store, out, size, seed, kw)
    _evaluate(model, tok, size, out / "eval", seed, domains)
    return f"seed {seed}: {name} ({time.time() - t0:.0f} s)"


def _seed_jobs(root: Path, seed: int, size: DemoSize, sweep: bool) -> tuple[dict[str, Path], list[tuple]]:
    """Run dirs and ``_job`` arguments of one seed (base evaluation + every method; the sweep if asked)."""
    sd = root / f"seed{seed}"
    jobs: list[tuple[str, dict | None]] = [("base", None)] + list(size.methods.items())
    if sweep:
        for name, (key, values) in size.sweep.items():
            jobs += [(f"{name}@{key}={v}", {**size.methods[name], key: v}) for v in values]
    runs = {name: sd / "runs" / name for name, _ in jobs}
    args = [
        (name, kw, sd / "base_model", sd / "store", runs[name], size, seed, ("add (in-domain)",) if "@" in name else None)
        for name, kw in jobs
    ]
    return runs, args


def run_seeds(root: Path, seeds: int, size: DemoSize, sweep: bool, workers: int = 2) -> list[dict[str, Path]]:
    """All seeds in one pool of ``workers`` single-threaded processes; the sweep on seed 0.

    A seed's base model (SFT) and reference store come first; its jobs (base evaluation, one training
    + evaluation per method) are queued as soon as they exist, so no worker waits for other seeds.
    For models this small, two single-threaded processes use two cores far better than one process
    with two threads (up to 10x when the cores are shared). Returns, per seed, run name -> run dir.
    """
    all_runs, per_seed = [], []
    for s in range(seeds):
        runs, args = _seed_jobs(root, s, size, sweep and s == 0)
        all_runs.append(runs)
        per_seed.append(args)
    total = seeds + sum(len(a) for a in per_seed)
    _say(f"{seeds} seed(s), {total} jobs on {workers} worker process(es): per seed a base model (SFT, "
         f"{size.sft_steps} steps) + reference store (presample {size.presample_n} x {size.train_prompts}), "
         f"then training + evaluation of {', '.join(size.methods)}" + (" and the sweep (seed 0)" if sweep else ""))
    done = 0
    if workers <= 1:
        for s in range(seeds):
            for fn, a in [(_prepare_seed, (root, s, size))] + [(_job, a) for a in per_seed[s]]:
                done += 1
                _say(f"done {done}/{total}: {fn(*a)}")
        return all_runs
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = {pool.submit(_prepare_seed, root, s, size): s for s in range(seeds)}
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


def summarize(all_runs: list[dict[str, Path]], size: DemoSize) -> dict:
    """Mean ± std over seeds of the numbers the issue's claims are about, and the claim checks."""
    ind, ood = "add (in-domain)", "sub (out-of-domain)"
    K = size.eval_n
    names = [n for n in all_runs[0] if "@" not in n]
    table: dict[str, dict[str, tuple[float, float]]] = {}

    def ms(xs: list[float]) -> tuple[float, float]:
        return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)

    for n in names:
        table[n] = {
            "pass@1": ms([_metric(r[n], ind, "pass", 1) for r in all_runs]),
            f"pass@{K}": ms([_metric(r[n], ind, "pass", K) for r in all_runs]),
            "styles": ms([_metric(r[n], ind, "styles") for r in all_runs]),
            "ood pass@1": ms([_metric(r[n], ood, "pass", 1) for r in all_runs]),
            f"ood pass@{K}": ms([_metric(r[n], ood, "pass", K) for r in all_runs]),
        }
    b = table["base"]
    pk = f"pass@{K}"

    def ood_loss(n: str) -> float:
        return b[f"ood {pk}"][0] - table[n][f"ood {pk}"][0]

    checks = {
        "RL works: pass@1 of every trained method > base": all(
            table[n]["pass@1"][0] > b["pass@1"][0] for n in names if n != "base"
        ),
        f"collapse: GRPO {pk} >= 3 points below base": table["grpo"][pk][0] <= b[pk][0] - 0.03,
        "collapse: GRPO effective styles <= half of base": table["grpo"]["styles"][0] <= b["styles"][0] / 2,
    }
    for d in ("dph-f", "dph-js"):
        gap = table[d][pk][0] - table["grpo"][pk][0]
        std = max(table[d][pk][1], table["grpo"][pk][1])
        checks[f"cure: {d} {pk} >= GRPO + 3 points (gap {gap:+.3f}, std {std:.3f})"] = gap >= 0.03 and gap > std
        checks[f"cure: {d} keeps more styles than GRPO"] = table[d]["styles"][0] > table["grpo"]["styles"][0]
        checks[f"cure: {d} loses less out of domain ({pk}) than GRPO and RKL"] = ood_loss(d) < min(
            ood_loss("grpo"), ood_loss("rkl")
        )
    return {"seeds": len(all_runs), "table": table, "checks": checks}


def plot_frontier(all_runs: list[dict[str, Path]], size: DemoSize, path: Path) -> Path | None:
    """Pass@1 vs Pass@K for the eta / kl_coef sweep, GRPO and base as points (mean over the runs given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ind, K = "add (in-domain)", size.eval_n
    if not any("@" in n for n in all_runs[0]):
        return None

    def pt(n: str) -> tuple[float, float]:
        return (
            statistics.mean(_metric(r[n], ind, "pass", 1) for r in all_runs),
            statistics.mean(_metric(r[n], ind, "pass", K) for r in all_runs),
        )

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for fam, (key, values) in size.sweep.items():
        main_v = size.methods[fam][key]
        pts = sorted([(v, pt(f"{fam}@{key}={v}")) for v in values] + [(main_v, pt(fam))])
        ax.plot([p[1][0] for p in pts], [p[1][1] for p in pts], "o-", label=f"{fam} ({key})")
        for v, (x, y) in pts:
            ax.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for n, mk in (("grpo", "s"), ("dapo", "D"), ("base", "*")):
        x, y = pt(n)
        ax.plot([x], [y], mk, markersize=11 if n == "base" else 8, color="black" if n == "base" else None, label=n)
    ax.set_xlabel("Pass@1 (in domain)")
    ax.set_ylabel(f"Pass@{K} (in domain)")
    ax.set_title("Trade-off: divergence weight sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _summary_md(summary: dict, size: DemoSize, seconds: float, frontier: Path | None) -> str:
    K = size.eval_n
    lines = [
        "# dphrl demo: diversity collapse and its cure",
        "",
        f"{summary['seeds']} seed(s); mean ± std over seeds; in domain = a+b (RL task), out of domain = a-b. "
        f"Wall time of this invocation {seconds / 60:.1f} min (a resumed demo skips finished jobs).",
        "",
        "How style validity arises: " + styles.VALIDITY_NOTE,
        "",
        f"| method | Pass@1 | Pass@{K} | effective styles | OOD Pass@1 | OOD Pass@{K} |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in summary["table"].items():
        cells = [f"{m:.3f} ± {s:.3f}" if k != "styles" else f"{m:.2f} ± {s:.2f}" for k, (m, s) in row.items()]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Claims checked on these numbers", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {c}" for c, ok in summary["checks"].items()]
    if frontier:
        lines += ["", f"![trade-off]({frontier.name})"]
    lines += ["", "## Budget", "", "```", json.dumps(asdict(size), indent=1), "```", ""]
    return "\n".join(lines)


def run_demo(out: Path, quick: bool = False, seeds: int = 1, sweep: bool = False, workers: int = 2) -> dict:
    """Run the whole demo and write ``out/report`` (report.md/html, PNGs, summary.json/md)."""
    from dphrl.evaluation.report import print_table, write_report

    size = QUICK if quick else FULL
    t0 = time.time()
    all_runs = run_seeds(out, seeds, size, sweep, workers)
    rep = out / "report"
    if rep.exists():
        shutil.rmtree(rep)
    names = [n for n in all_runs[0] if "@" not in n]
    mapping = {n: [r[n] for r in all_runs] for n in names}
    paths = write_report(mapping, rep, title="dphrl demo: diversity collapse and its cure")
    summary = summarize(all_runs, size)
    frontier = plot_frontier(all_runs[:1], size, rep / "frontier.png")
    seconds = time.time() - t0
    (rep / "summary.json").write_text(json.dumps({**summary, "size": asdict(size), "seconds": seconds}, indent=1))
    (rep / "summary.md").write_text(_summary_md(summary, size, seconds, frontier))
    print_table(mapping)
    for c, ok in summary["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {c}")
    _say(f"done in {seconds / 60:.1f} min; report: {paths['html']} and {rep / 'summary.md'}")
    return summary
