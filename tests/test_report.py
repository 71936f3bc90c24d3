"""Reports: tables (mean ± std over seeds, Δ vs base), plots, self-contained HTML, end to end."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dphrl.data.example import Example
from dphrl.evaluation import evaluate, rescore, write_report
from dphrl.evaluation.report import eval_curves, eval_table, findings, load_runs, main_table, print_table


def fake_results(
    pass1: float, pass16: float, greedy: float, *, seed: int = 0, styles: dict | None = None
) -> dict:
    """A minimal results.json with pass@k interpolated between k=1 and k=16."""
    ks = [1, 2, 4, 8, 16]
    passk = {str(k): pass1 + (pass16 - pass1) * i / 4 for i, k in enumerate(ks)}
    ds = {
        "num_problems": 10,
        "n": 16,
        "ks": ks,
        "greedy": greedy,
        "mean@n": pass1,
        "pass@k": passk,
        "diversity": {
            "distinct_correct_solutions": 3.0,
            "distinct_1": 0.4,
            "distinct_2": 0.6,
            "pairwise_similarity": 0.5,
            "distinct_correct_answers": None,
        },
    }
    if styles is not None:
        from dphrl.evaluation.metrics import effective_number

        ds["styles"] = {"shares": styles, "accuracy": {}, "effective_styles": effective_number(styles)}
    cfg = {
        "n": 16,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": seed,
        "model": "m",
        "reward_failures": {"sql": 0},
    }
    return {"config": cfg, "datasets": {"sql": ds, "math": dict(ds, styles=None) if styles else ds}}


def write_run(d: Path, res: dict, *, at_root: bool = False, log: list[dict] | None = None) -> Path:
    target = d if at_root else d / "eval"
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(res))
    if log is not None:
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\nnot json\n")
    return d


def test_multi_seed_table_delta_and_findings(tmp_path):
    base = write_run(tmp_path / "base", fake_results(0.40, 0.80, 0.42, styles={"cte": 0.5, "join": 0.5}))
    g1 = write_run(
        tmp_path / "grpo1", fake_results(0.60, 0.70, 0.58, seed=1, styles={"cte": 0.9, "join": 0.1})
    )
    g2 = write_run(
        tmp_path / "grpo2", fake_results(0.50, 0.66, 0.60, seed=2, styles={"cte": 1.0}), at_root=True
    )
    runs = load_runs({"base": base, "grpo": [g1, g2]})
    assert [r.name for r in runs] == ["base", "grpo"] and len(runs[1].results) == 2
    t = main_table(runs)
    assert t.header[:9] == [
        "dataset",
        "method",
        "seeds",
        "greedy",
        "pass@1",
        "pass@2",
        "pass@4",
        "pass@8",
        "pass@16",
    ]
    assert t.header[-4:] == ["eff. styles", "Δ greedy", "Δ pass@1", "Δ pass@16"]
    sql_grpo = next(r for r in t.rows if r[:2] == ["sql", "grpo"])
    assert sql_grpo[2] == "2"
    assert sql_grpo[3] == "59.0 ± 1.4"  # greedy 58, 60
    assert sql_grpo[4] == "55.0 ± 7.1"  # pass@1 60, 50: stdev 7.07
    assert sql_grpo[8] == "68.0 ± 2.8"  # pass@16 70, 66
    assert sql_grpo[-3:] == ["+17.0 ± 1.4", "+15.0 ± 7.1", "-12.0 ± 2.8"]
    sql_base = next(r for r in t.rows if r[:2] == ["sql", "base"])
    assert sql_base[4] == "40.0" and sql_base[-3:] == ["", "", ""] and sql_base[-4] == "2.00"
    notes = findings(runs)
    assert any("grpo" in n and "sql" in n and "collapse" in n and "k = 8" in n for n in notes), notes

    out = write_report({"base": base, "grpo": [g1, g2]}, tmp_path / "report", title="T")
    assert set(out) == {"md", "html", "passk", "styles"}  # no metrics.jsonl: no training plot
    md = out["md"].read_text()
    assert "| sql | grpo | 2 | 59.0 ± 1.4 |" in md and "| sql | base | 1 |" in md
    assert "![" in md and "passk.png" in md and "styles.png" in md and "## Findings" in md
    assert out["styles"].stat().st_size > 5000

    text = print_table({"base": base, "grpo": [g1, g2]})
    assert "59.0 ± 1.4" in text and "collapse" in text


def test_training_plot_and_list_input(tmp_path):
    log = [
        {
            "step": s,
            "reward/mean": s / 10,
            "entropy": 1 - s / 20,
            "div/value": 0.01 * s,
            "response_length/mean": 50 + s,
        }
        for s in range(12)
    ]
    a = write_run(tmp_path / "a" / "run", fake_results(0.3, 0.6, 0.3), log=log)
    b = write_run(tmp_path / "b" / "run", fake_results(0.5, 0.5, 0.5), log=[{"reward": 0.1}, {"reward": 0.2}])
    runs = load_runs([a, b])
    assert [r.name for r in runs] == ["run", "run-2"]  # deduplicated names
    assert len(runs[0].training[0]) == 12  # the malformed line is skipped
    out = write_report([a, b], tmp_path / "rep")
    assert {"md", "html", "passk", "training"} <= set(out) and "styles" not in out
    assert out["training"].stat().st_size > 5000
    assert "Δ" not in out["md"].read_text().split("## Findings")[0].split("\n")[6]  # no base: no Δ columns
    # training logs without eval/... keys: no Pass@k-over-steps figure, table or section
    assert "passk_steps" not in out and eval_table(runs) is None
    assert "over training steps" not in out["md"].read_text() + out["html"].read_text()


def test_eval_curves_parses_keys_exactly():
    ds = "add (in-domain)"
    lines = [
        {"step": 0, "reward/mean": 0.1},
        {"step": 0, f"eval/{ds}/pass@1": 0.25, f"eval/{ds}/pass@16": 0.75, f"eval/{ds}/effective_styles": 3},
        {"step": 0, "eval/gsm8k/test/greedy_acc": 0.5},  # the metric follows the last slash
        json.dumps({"step": 10, f"eval/{ds}/pass@1": 0.5}),  # a JSON line works too
        {"step": 10, "reward/mean": 0.3},  # step 10 again: a training line between eval lines
        {"step": 10, f"eval/{ds}/pass@16": 0.625, f"eval/{ds}/pass@1": 0.375},  # logged twice: last wins
        {f"eval/{ds}/pass@1": 0.9},  # no step: skipped
        {"step": True, f"eval/{ds}/pass@1": 0.9},  # a bool is no step
        {
            "step": 20,
            f"eval/{ds}/pass@1": float("nan"),
            f"eval/{ds}/mean_reward": True,
            f"eval/{ds}/distinct_correct": "3",
            f"eval/{ds}/greedy_acc": 0.5,
            "eval//pass@1": 0.1,
            "eval/x/": 0.2,
            "evaluation/x/pass@1": 0.3,
        },
        {"step": 5, f"eval/{ds}/pass@1": 0.3},  # out of order: sorted by step
        "not json",
        [1, 2],
    ]
    assert eval_curves(lines) == {
        ds: {
            "pass@1": [(0, 0.25), (5, 0.3), (10, 0.375)],
            "pass@16": [(0, 0.75), (10, 0.625)],
            "effective_styles": [(0, 3.0)],
            "greedy_acc": [(20, 0.5)],
        },
        "gsm8k/test": {"greedy_acc": [(0, 0.5)]},
    }
    assert eval_curves([]) == {} and eval_curves([{"step": 1, "reward/mean": 1.0}]) == {}


def _eval_log(ds_vals: dict[str, dict[str, list[float]]], steps: list[int]) -> list[dict]:
    """metrics.jsonl records: a training line per step, then that step's eval/... keys on their own line."""
    log = []
    for i, s in enumerate(steps):
        log.append({"step": s, "reward/mean": 0.1 * i, "entropy": 1.0 - 0.1 * i})
        log.append({"step": s, **{f"eval/{d}/{m}": v[i] for d, ms in ds_vals.items() for m, v in ms.items()}})
    return log


def test_passk_over_training_steps_figure_table_and_html(tmp_path):
    add, sub = "add (in-domain)", "sub (out-of-domain)"
    steps = [0, 10, 20]

    def vals(p1: list[float], pn: list[float], n: int, sty: list[float] | None = None) -> dict:
        ks = {
            f"pass@{k}": [a + (b - a) * j / 4 for a, b in zip(p1, pn)]
            for j, k in enumerate((2, 4, 8))
            if k < n
        }
        out = {
            "pass@1": p1,
            **ks,
            f"pass@{n}": pn,
            "greedy_acc": p1,
            "mean_reward": p1,
            "distinct_correct": [2, 2, 1],
        }
        return out | ({"effective_styles": sty} if sty else {})

    g1 = write_run(
        tmp_path / "g1",
        fake_results(0.6, 0.4, 0.6),
        log=_eval_log(
            {
                add: vals([0.2, 0.4, 0.6], [0.8, 0.6, 0.4], 16, [3.0, 2.0, 1.2]),
                sub: vals([0.1] * 3, [0.5, 0.4, 0.3], 16),
            },
            steps,
        ),
    )
    g2 = write_run(
        tmp_path / "g2",
        fake_results(0.6, 0.4, 0.6),
        log=_eval_log({add: vals([0.4, 0.4, 0.6], [0.8, 0.6, 0.4], 16, [3.0, 2.0, 1.2])}, steps),
    )
    d = write_run(
        tmp_path / "d",
        fake_results(0.5, 0.8, 0.5),
        log=_eval_log({add: vals([0.2, 0.3, 0.5], [0.8, 0.8, 0.85], 8, [3.0, 3.0, 2.8])}, [0, 10]),
    )
    mapping = {"base": write_run(tmp_path / "base", fake_results(0.4, 0.8, 0.4)), "grpo": [g1, g2], "dph": d}
    t = eval_table(load_runs(mapping))
    assert t is not None and t.header == [
        "dataset",
        "method",
        "evals",
        "first step",
        "last step",
        "pass@1 first → last",
        "n",
        "pass@n first → last",
        "eff. styles first → last",
    ]
    assert t.rows == [
        [
            add,
            "grpo",
            "3",
            "0",
            "20",
            "30.0 ± 14.1 → 60.0 ± 0.0",
            "16",
            "80.0 ± 0.0 → 40.0 ± 0.0",
            "3.00 ± 0.00 → 1.20 ± 0.00",
        ],
        [add, "dph", "2", "0", "10", "20.0 → 30.0", "8", "80.0 → 80.0", "3.00 → 3.00"],
        [sub, "grpo", "3", "0", "20", "10.0 → 10.0", "16", "50.0 → 30.0", "- → -"],
    ]  # the base run has no metrics.jsonl: no row

    out = write_report(mapping, tmp_path / "rep")
    assert {"passk", "training", "passk_steps"} <= set(out)
    png = out["passk_steps"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    page = out["html"].read_text()
    assert "<h2>Pass@k over training steps</h2>" in page
    assert f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}'" in page
    assert f"<td>{html.escape(add)}</td><td>dph</td><td>2</td>" in page
    md = out["md"].read_text()
    assert "## Pass@k over training steps" in md and "(passk_steps.png)" in md
    assert f"| {add} | dph | 2 | 0 | 10 | 20.0 → 30.0 | 8 | 80.0 → 80.0 | 3.00 → 3.00 |" in md


def test_missing_results_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        write_report([tmp_path / "empty"], tmp_path / "out")


# ------------------------------------------------------------------------------------------ end to end
def _hf_engine():
    try:
        from dphrl.engines.hf import HFEngine
    except ImportError as e:
        pytest.skip(f"dphrl.engines.hf not importable yet ({e})")
    return HFEngine


def has_digit(response: str, ex: Example) -> float:
    return 1.0 if any(ch.isdigit() for ch in response) else 0.0


def first_char(response: str) -> str | None:
    return response[:1] or None


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory):
    HFEngine = _hf_engine()
    from dphrl.data.tokenizer import build_char_tokenizer
    from dphrl.testing import tiny_causal_lm

    tok = build_char_tokenizer()
    root = tmp_path_factory.mktemp("e2e")
    examples = [
        Example(id=f"q{i}", prompt=[{"role": "user", "content": f"count {i}"}], answer=str(i), task="toy")
        for i in range(3)
    ]
    dirs, results = {}, {}
    for name, model_seed in (("base", 0), ("rl", 1)):
        engine = HFEngine(tiny_causal_lm(tok, seed=model_seed), tok, batch_size=16)
        results[name] = evaluate(
            engine,
            tok,
            {"toy": examples},
            {"toy": has_digit},
            n=4,
            max_new_tokens=12,
            seed=0,
            out_dir=root / name / "eval",
            style_fn=first_char,
            answer_fn=first_char,
            progress=False,
            show_table=False,
            model_name=f"tiny-{name}",
        )
        dirs[name] = root / name
    return examples, dirs, results, root


def test_e2e_eval_files_and_rescore(e2e_runs):
    examples, dirs, results, _ = e2e_runs
    for name, d in dirs.items():
        res = json.loads((d / "eval" / "results.json").read_text())
        m = res["datasets"]["toy"]
        assert res["config"]["model"] == f"tiny-{name}" and res["config"]["n"] == 4
        assert m["num_problems"] == 3 and set(m["pass@k"]) == {"1", "2", "4"}
        assert all(0.0 <= v <= 1.0 for v in m["pass@k"].values())
        recs = [json.loads(line) for line in (d / "eval" / "samples.jsonl").read_text().splitlines()]
        assert len(recs) == 3 * 5
        for r in recs:
            assert r["reward"] == has_digit(r["response"], examples[r["problem"]])
            assert 0 < r["num_tokens"] <= 12 and isinstance(r["finished"], bool)
        c = m["per_problem"]["correct"]
        assert m["pass@k"]["4"] == pytest.approx(sum(x > 0 for x in c) / 3)
        again = rescore(
            d / "eval" / "samples.jsonl",
            {"toy": examples},
            {"toy": has_digit},
            answer_fn=first_char,
            style_fn=first_char,
        )
        assert again["datasets"] == results[name]["datasets"] == res["datasets"]


def test_e2e_report(e2e_runs):
    _, dirs, _, root = e2e_runs
    log = [{"step": s, "reward/mean": 0.1 * s, "entropy": 2.0 - 0.1 * s} for s in range(5)]
    (dirs["rl"] / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    out = write_report([dirs["base"], dirs["rl"]], root / "report", title="E2E")
    for key in ("md", "html", "passk", "training", "styles"):
        assert out[key].is_file() and out[key].stat().st_size > 0, key
    for key in ("passk", "training", "styles"):
        assert out[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out["md"].read_text()
    assert re.search(r"^\| toy \| base \| 1 \|", md, re.M) and re.search(r"^\| toy \| rl \| 1 \|", md, re.M)
    page = out["html"].read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, re.I)
    assert len(refs) == 3 and all(r.startswith("data:image/png;base64,") for r in refs)
    assert not re.search(r"https?://|url\(|<script|<link", page, re.I)
    assert "<td>rl</td>" in page and "<td>base</td>" in page


def _chromium() -> str | None:
    return next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None
    )


def test_html_renders_in_headless_browser(e2e_runs, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH: headless HTML rendering not checked")
    _, dirs, _, _ = e2e_runs
    out = write_report({"base": dirs["base"], "rl": dirs["rl"]}, tmp_path / "rep")
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        out["html"].resolve().as_uri(),
    ]
    try:
        subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("headless browser did not finish within 60 s")
    assert shot.is_file(), "browser wrote no screenshot"
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank page compresses to a few KB
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert float(img[..., :3].std()) > 0.05  # not a uniform page


def test_findings_name_widened_coverage():
    from dphrl.evaluation.findings import findings
    from dphrl.evaluation.report_data import Run

    def run(name: str, p1: float, p16: float) -> Run:
        return Run(name, [], [{"datasets": {"d": {"pass@k": {"1": p1, "16": p16}}}}])

    notes = findings([run("base", 0.24, 0.58), run("rkl", 0.55, 0.84), run("grpo", 0.60, 0.575)])
    assert notes[0].endswith("coverage at large k widened.") and "**rkl**" in notes[0]
    assert notes[1].endswith("coverage at large k kept (within 1 pt).")


def test_findings_call_a_large_k_change_within_two_paired_standard_errors_kept():
    from dphrl.evaluation.findings import findings
    from dphrl.evaluation.metrics import pass_at_k
    from dphrl.evaluation.report_data import Run, paired_se

    def run(name: str, correct: list[int]) -> Run:
        ids = [f"p{i}" for i in range(len(correct))]
        mean = {k: sum(pass_at_k(4, c, k) for c in correct) / len(correct) for k in (1, 4)}
        d = {"n": 4, "pass@k": {str(k): v for k, v in mean.items()},
             "per_problem": {"id": ids, "correct": correct}}
        return Run(name, [], [{"datasets": {"d": d}}])

    # 4 problems, pass@4 base [1, 1, 1, 0], run [1, 1, 0, 0]: differences [0, 0, -1, 0], mean -0.25,
    # sample std 0.5, standard error 0.5 / sqrt(4) = 0.25: a one-problem loss is within 2 SE = 50 pts
    base, rl = run("base", [1, 1, 1, 0]), run("grpo", [4, 4, 0, 0])
    assert paired_se(rl, base, "d", 4) == pytest.approx((0.25, 4))
    (note,) = findings([base, rl])
    assert "pass@4 -25.0 pts" in note
    assert note.endswith("kept (within ±50.0 pts, 2 standard errors over 4 problems).")
    # the same run without per-problem counts: the fixed 1-point tolerance calls it a collapse
    bare = [Run(r.name, [], [{"datasets": {"d": {"pass@k": r.results[0]["datasets"]["d"]["pass@k"]}}}])
            for r in (base, rl)]
    assert "collapse" in findings(bare)[0]
    # 100 problems, half lost at k = 4: -50 pts against 2 SE of ~10 pts is a collapse
    base, rl = run("base", [1] * 100), run("grpo", [4] * 50 + [0] * 50)
    se, n = paired_se(rl, base, "d", 4)
    assert n == 100 and se == pytest.approx(0.5 * (100 / 99) ** 0.5 / 10)
    assert "Pass@k collapse" in findings([base, rl])[0]
