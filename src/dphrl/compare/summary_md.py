"""``summary.md`` and ``frontier.png`` of a compare report, from :func:`dphrl.compare.summary.summarize`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["plot_frontier", "summary_markdown", "top_sentence"]


def _header(key: str) -> str:
    """Column title of a table key: ``ood pass@16`` -> ``OOD Pass@16``, ``styles`` -> ``effective styles``."""
    if key.endswith("answer acc"):
        label, name = key[: -len("answer acc")].strip(), "answer acc."
    else:
        label, _, name = key.rpartition(" ")
    name = "effective styles" if name == "styles" else name.replace("pass@", "Pass@")
    return f"{'OOD' if label == 'ood' else label} {name}".strip()


def _cells(row: dict[str, tuple[float, float]], keys: list[str]) -> list[str]:
    out = []
    for k in keys:
        if k not in row:
            out.append("-")
        else:
            m, s = row[k]
            out.append(f"{m:.2f} ± {s:.2f}" if k == "styles" else f"{m:.3f} ± {s:.3f}")
    return out


def _table(rows: dict[str, dict], first: str) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = [f"| {first} | " + " | ".join(_header(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    return lines + [f"| {n} | " + " | ".join(_cells(r, keys)) + " |" for n, r in rows.items()]


def top_sentence(points: list[dict], dom: str) -> str:
    """One plain sentence: which family is on top at how many matched points, and whether clearly."""
    tops = [p[f"top_{dom}"] for p in points]
    best = max(set(tops), key=tops.count)
    clear = sum(1 for p in points if p[f"top_{dom}"] == best and p[f"clear_{dom}"])
    noise = ("one seed: no seed std to compare the lead with" if points[0][f"clear_{dom}"] is None else
             f"by more than the seed std at {clear} of them")
    return (f"{best} is on top at {tops.count(best)} of {len(points)} matched Pass@1 values, {noise}"
            + (f"; elsewhere {', '.join(sorted(set(tops) - {best}))}" if len(set(tops)) > 1 else "") + ".")


def _matched(matched: dict[str, Any], k: int) -> list[str]:
    if not matched:
        return []
    if not matched.get("points"):
        return ["", "The swept families' Pass@1 ranges do not overlap on every seed: no matched comparison."]
    fams = matched["families"]
    lines = ["", f"## Which family lies on top at matched Pass@1 (Pass@{k}, mean ± std over seeds)", "",
             f"Each family's coefficients give a Pass@1-Pass@{k} curve per seed; Pass@{k} is interpolated at "
             f"in-domain Pass@1 values inside the range every family covers on every seed "
             f"([{matched['overlap'][0]:.3f}, {matched['overlap'][1]:.3f}]).", ""]
    for lab, set_name in (matched.get("sets") or {"in": "in domain", "ood": "out of domain"}).items():
        lines += [f"**{set_name}**: " + top_sentence(matched["points"], lab), "",
                  "| Pass@1 | " + " | ".join(fams) + " | on top (lead over 2nd) |",
                  "|---|" + "---|" * (len(fams) + 1)]
        for row in matched["points"]:
            cells = [f"{row[lab][f][0]:.3f} ± {row[lab][f][1]:.3f}" for f in fams]
            lead = f"{row[f'top_{lab}']} (+{row[f'margin_{lab}']:.3f} over {row[f'second_{lab}']}" + (
                ", within seed std)" if row[f"clear_{lab}"] is False else ")")
            lines.append(f"| {row['pass@1']:.3f} | " + " | ".join(cells) + f" | {lead} |")
        lines.append("")
    return lines


def _claims(summary: dict[str, Any]) -> list[str]:
    claims = summary.get("claims") or []
    if not claims:
        return []
    word = {True: "PASS", False: "FAIL", None: "NOT CHECKED"}
    lines = ["", "## Claims checked on these numbers", ""]
    lines += [f"- {word[c['ok']]}: {c['claim']} ({c['detail']})" for c in claims]
    if summary["seeds"] > 1:
        seeds = summary.get("seed_ids") or list(range(summary["seeds"]))
        lines += ["", "Each claim on every seed alone:", "",
                  "| claim | " + " | ".join(f"seed {s}" for s in seeds) + " | holds on |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for c in claims:
            held = sum(1 for x in c["per_seed"] if x)
            lines.append(f"| {c['claim']} | " + " | ".join(word[x] for x in c["per_seed"])
                         + f" | {held} of {len(seeds)} |")
    return lines


def _diff_table(rows: dict[str, dict[str, Any]], title: str, intro: str, first: str,
                span: bool = False) -> list[str]:
    """One table of per-seed difference stats (paired, against curves, family against family): a row per
    comparison, a column per metric; ``span`` adds the rows' Pass@1 ``overlap`` as a second column."""
    if not rows:
        return []
    keys = list(dict.fromkeys(k for row in rows.values() for k in row if k != "overlap"))
    lines = ["", f"## {title}", "", intro, "",
             f"| {first} | " + ("Pass@1 range | " if span else "") + " | ".join(_col(k) for k in keys) + " |",
             "|---|" + ("---|" if span else "") + "---|" * len(keys)]
    for name, row in rows.items():
        ov = row.get("overlap")
        lead = (f"{ov[0]:.3f}-{ov[1]:.3f} | " if ov else "none | ") if span else ""
        lines.append(f"| {name} | {lead}" + " | ".join(_diff_cell(row.get(k), k) for k in keys) + " |")
    return lines


def _paired(summary: dict[str, Any]) -> list[str]:
    rows = {pair.replace(" - ", " − "): row for pair, row in (summary.get("paired") or {}).items()}
    return _diff_table(
        rows, "Differences between methods, paired by seed",
        "Each cell: the mean ± std over seeds of (first run - second run) on the same seed, and on how "
        "many seeds the difference has the mean's sign. **Bold**: every seed agrees and |mean| > std "
        "(needs 2+ seeds). Forgetting is a KL: negative means the first run moved less from the base.",
        "runs")


def _col(key: str) -> str:
    """A difference table's column header."""
    return "forgetting (KL)" if key == "forgetting" else _header(key)


def _diff_cell(d: dict[str, Any] | None, key: str) -> str:
    """``+0.050 ± 0.042 (2/2)``, bold when clear, ``; outside on N`` when seeds were out of range."""
    if d is None:
        return "-"
    f = ".4f" if key == "forgetting" else ".3f"
    cell = f"{d['mean']:+{f}} ± {d['std']:{f}} ({d['agree']}/{d['n']})" if d["n"] else ""
    cell = f"**{cell}**" if d.get("clear") else cell
    return cell + (f"{'; ' if cell else ''}outside on {d['outside']}" if d.get("outside") else "")


def _against_curves(summary: dict[str, Any]) -> list[str]:
    return _diff_table(
        summary.get("against_curves") or {},
        "Each method against each swept family at the method's own Pass@1",
        "Each cell: on every seed, the method's number minus the family's curve (its runs' in-domain "
        "Pass@1 against the number, linear between points) read at the method's Pass@1; mean ± std "
        "over the seeds where that Pass@1 lies inside the family's range, and on how many the "
        "difference has the mean's sign. **Bold** as above; 'outside' counts the seeds out of range.",
        "method vs family")


def _family_gaps(summary: dict[str, Any]) -> list[str]:
    return _diff_table(
        summary.get("family_gaps") or {},
        "Family against family at matched Pass@1, over the range both cover",
        "Each cell: on every seed, the first family's curve minus the second's (in-domain Pass@1 "
        "against the number, linear between points), averaged over the Pass@1 range both families "
        "cover on that seed (its mean over seeds in the second column); mean ± std over the seeds "
        "where the ranges overlap, and on how many the difference has the mean's sign. **Bold** as "
        "above; 'outside' counts the seeds whose ranges do not overlap.",
        "families", span=True)


def _timing(summary: dict[str, Any]) -> list[str]:
    t = summary.get("timing") or {}
    if not t.get("runs"):
        return []
    lines = ["", "## Wall time per job (seconds, mean ± std over seeds)", "",
             "| run | prepare | train | eval |", "|---|---|---|---|"]
    for run, kinds in t["runs"].items():
        lines.append(f"| {run} | "
                     + " | ".join(f"{kinds[k][0]:.0f} ± {kinds[k][1]:.0f}" if k in kinds else "-"
                                  for k in ("prepare", "train", "eval")) + " |")
    return lines + ["", f"Sum over the jobs run: {t['total_job_seconds'] / 60:.1f} min."]


def summary_markdown(summary: dict[str, Any], *, title: str, k: int, description: str = "",
                     seconds: float = 0.0, frontier: Path | None = None,
                     experiment: dict[str, Any] | None = None) -> str:
    """The whole ``summary.md``: tables, claims, matched frontier, forgetting, wall time, failures."""
    lines = [f"# {title}", "",
             f"{summary['seeds']} seed(s); mean ± std over seeds. Wall time of this invocation "
             f"{seconds / 60:.1f} min (a resumed experiment skips finished jobs)."]
    if description:
        lines += ["", description.strip()]
    n_seeds, have = summary["seeds"], summary.get("runs_per_seed", {})
    partial = {n for n in summary["table"] if have.get(n, n_seeds) < n_seeds}
    table = {(f"{n} ({have[n]} of {n_seeds} seeds)" if n in partial else n): r
             for n, r in summary["table"].items()}
    lines += ["", *_table(table, "method"), ""]
    if partial:
        lines += ["Not every seed has finished: a row marked (k of N seeds) is the mean ± std of its k "
                  "finished seeds (± 0 for one seed), not comparable in spread with the full rows.", ""]
    if experiment is not None and not experiment.get("base_model") and summary["seeds"] > 1:
        lines += ["The base model does not depend on the seed: it is evaluated once (the first seed's "
                  "samples), so its ± is 0 by construction.", ""]
    lines += ["Pass@k tables and curves per set, Pass@k over training steps, training curves and style "
              "shares of the base and the methods: [report.md](report.md), self-contained "
              "[report.html](report.html)."]
    lines += _claims(summary)
    lines += _paired(summary)
    lines += _against_curves(summary)
    lines += _matched(summary.get("matched") or {}, k)
    lines += _family_gaps(summary)
    if summary.get("forgetting"):
        lines += ["", "## Forgetting (forward KL from the base per token, on the base's samples of "
                  "held-out prompts)", "", "| run | KL per token |", "|---|---|"]
        lines += [f"| {n}{f' ({have[n]} of {n_seeds} seeds)' if have.get(n, n_seeds) < n_seeds else ''} | "
                  f"{m:.4f} ± {s:.4f} |" for n, (m, s) in summary["forgetting"].items()]
    if summary["sweep"]:
        sweep = {(f"{n} ({have[n]} of {n_seeds} seeds)" if have.get(n, n_seeds) < n_seeds else n): r
                 for n, r in summary["sweep"].items()}
        lines += ["", "## Sweep and ablations", "", *_table(sweep, "run")]
    if frontier:
        lines += ["", f"![trade-off]({frontier.name})"]
    if summary.get("failed"):
        lines += (["", "## Jobs that did not finish", ""]
                  + [f"- {i}: {e}" for i, e in summary["failed"].items()])
    lines += _timing(summary)
    if experiment is not None:
        lines += ["", "## Experiment", "", "```yaml", yaml.safe_dump(experiment, sort_keys=False).strip(),
                  "```"]
    return "\n".join(lines + [""])


def plot_frontier(summary: dict[str, Any], sweeps: dict[str, list[tuple[Any, str]]], sets: dict[str, str],
                  k: int, path: Path, markers: tuple[str, ...] = ("grpo", "dapo", "base")) -> Path | None:
    """In-domain Pass@1 against Pass@K on every set: each swept family's runs as a curve (mean ± std over
    seeds, points labelled with their coefficient), the ``markers`` runs as single points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**summary["table"], **summary["sweep"]}
    fams = {f: pts for f, pts in sweeps.items() if sum(n in rows for _, n in pts) >= 2}
    if not fams:
        return None
    ykeys = [(f"pass@{k}" if lab == "in" else f"{lab} pass@{k}", name) for lab, name in sets.items()]
    fig, axes = plt.subplots(1, len(ykeys), figsize=(6 * len(ykeys), 5), squeeze=False)
    for ax, (ykey, name) in zip(axes[0], ykeys):
        for i, (fam, pts) in enumerate(fams.items()):
            have = sorted(((rows[n]["pass@1"][0], v, rows[n]) for v, n in pts if n in rows),
                          key=lambda t: t[0])
            # 10 colours, then the same colours dashed with triangles: no two families look alike
            line = ax.errorbar([x for x, _, _ in have], [p[ykey][0] for _, _, p in have],
                               xerr=[p["pass@1"][1] for _, _, p in have],
                               yerr=[p[ykey][1] for _, _, p in have],
                               fmt="o-" if i < 10 else "^--", color=f"C{i % 10}", capsize=2, label=fam)
            for x, v, p in have:
                ax.annotate("default" if v is None else f"{v:g}" if isinstance(v, float) else str(v),
                            (x, p[ykey][0]), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=line[0].get_color())
        for n, mk in [(n, mk) for n, mk in zip(markers, "sD*")
                      if n in rows and ykey in rows[n] and n not in fams]:  # a swept marker is its curve
            p = rows[n]
            ax.errorbar([p["pass@1"][0]], [p[ykey][0]], xerr=[p["pass@1"][1]], yerr=[p[ykey][1]], fmt=mk,
                        markersize=11 if n == "base" else 8, color="black",
                        markerfacecolor="black" if n == "base" else "white", label=n)
        ax.set_xlabel("Pass@1 (in domain)")
        ax.set_ylabel(f"Pass@{k} ({name})")
        ax.set_title(f"Pass@1 vs Pass@{k}, {name}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Coefficient sweep: mean ± std over {summary['seeds']} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
