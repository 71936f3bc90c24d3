"""Reports over hostile names: run, dataset, style and model names and titles that are Markdown,
HTML or mathtext must come out as plain text, keep every table's columns and never lose a plot."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dphrl.evaluation import plots, write_report
from dphrl.evaluation import report as rp

HOSTILE = [
    "a|b||c",
    "`tick` ``code``",
    "<script>alert(1)</script>",
    r"$\frac{1}{0}$",
    "$$",
    "price $5",
    r"$\undefined$ $x^$",
    "line1\nline2\r\n| x | y |",
    "# heading",
    "[click](javascript:alert(1)) ![i](x.png) <http://evil> http://evil.example www.evil.example",
    "**bold** _it_ ~~s~~ &amp; trailing\\",
    "漢字 🤖 \u202e ok",
]
DATASETS = ["ds|<b>$$</b>", "add (in-domain)\n# x"]
STYLES = ["$x^$", "|", "<i>", "`"]
PNG = b"\x89PNG\r\n\x1a\n"


def one_line(s: str) -> str:
    """What a name looks like once rendered: on one line, controls (NUL, bidi override) shown as U+FFFD."""
    return s.replace("\r\n", " ").replace("\n", " ").replace("\x00", "\ufffd").replace("\u202e", "\ufffd")


def results(p1: float, pn: float, model: str) -> dict:
    ks = [1, 2, 4, 8]
    ds = {
        "pass@k": {str(k): p1 + (pn - p1) * i / 3 for i, k in enumerate(ks)},
        "greedy": p1,
        "maj@k": {"8": p1},
        "diversity": {"distinct_1": 0.5},
        "styles": {"shares": {s: 1 / len(STYLES) for s in STYLES}, "effective_styles": 4.0},
    }
    return {"config": {"model": model, "n": 8, "seed": 0}, "datasets": {d: ds for d in DATASETS}}


def write(d: Path, res: dict, log: list[dict] | None = None) -> Path:
    (d / "eval").mkdir(parents=True)
    (d / "eval" / "results.json").write_text(json.dumps(res))
    if log is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return d


def eval_log() -> list[dict]:
    log = []
    for i, step in enumerate((0, 5, 10)):
        log.append({"step": step, "reward/mean": 0.1 * i, "entropy": 1.0 - 0.2 * i})
        for d in DATASETS:
            log.append({"step": step, f"eval/{d}/pass@1": 0.2 + 0.1 * i, f"eval/{d}/pass@8": 0.8 - 0.1 * i})
            log[-1][f"eval/{d}/effective_styles"] = 3.0 - i
    return log


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory) -> tuple[dict[str, Path], str]:
    root = tmp_path_factory.mktemp("hostile")
    mapping = {"base": write(root / "base", results(0.3, 0.8, "m"))}
    for i, name in enumerate(HOSTILE):
        mapping[name] = write(root / f"r{i}", results(0.6, 0.5, name), eval_log() if i % 2 else None)
    title = "<script>t()</script> | $$ # `x` [l](javascript:x)"
    return write_report(mapping, root / "report", title=title), title


def md_cells(line: str) -> list[str]:
    """Split a GFM table row on its unescaped pipes (a backslash escapes the next character)."""
    cells, cur, i = [], "", 0
    body = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            cur += body[i : i + 2]
            i += 2
            continue
        if body[i] == "|":
            cells.append(cur)
            cur = ""
        else:
            cur += body[i]
        i += 1
    return cells + [cur]


def md_tables(md: str) -> list[list[str]]:
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def test_hostile_names_markdown_keeps_tables_and_has_no_markup(hostile_report):
    out, _ = hostile_report
    md = out["md"].read_text()
    tables = md_tables(md)
    assert len(tables) == 4  # results, eval over steps, diversity, styles: no row broke out of one
    for t in tables:
        width = len(md_cells(t[0]))
        assert re.fullmatch(r"\|(---\|)+", t[1]) and t[1].count("---") == width
        assert all(len(md_cells(row)) == width for row in t), t
    main = tables[0]
    assert len(main) == 2 + 2 * (1 + len(HOSTILE))  # a row per dataset × run: no row split by a newline
    assert "<" not in md and ">" not in md  # no raw HTML at all (entities only)
    links = re.findall(r"(?<!\\)\]\(([^)]*)\)", md)
    assert sorted(links) == ["passk.png", "passk_steps.png", "styles.png", "training.png"]
    assert not re.search(r"(?<!\\)`", md)  # no code spans
    assert not re.search(r"(?<!\\)\$", md)  # no (GitHub) math
    headings = [line for line in md.splitlines() if line.lstrip().startswith("#")]
    assert headings[1:] == [
        "## Results",
        "## Findings",
        "## Plots",
        "## Pass@k over training steps",
        "## Diversity",
        "## Styles",
        "## Runs",
    ]  # only the report's own headings


def test_hostile_names_plots_are_written(hostile_report):
    out, _ = hostile_report
    for key in ("passk", "training", "styles", "passk_steps"):
        data = out[key].read_bytes()
        assert data[:8] == PNG and len(data) > 5000, key
    assert "could not be drawn" not in out["md"].read_text()


def test_hostile_names_html_is_escaped(hostile_report):
    out, title = hostile_report
    page = out["html"].read_text()
    assert "<script" not in page.lower() and "javascript:x" in page  # text kept, tag escaped
    assert html.escape("<script>alert(1)</script>") in page and html.escape(title) in page
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, re.I)
    assert len(refs) == 4 and all(r.startswith("data:image/png;base64,") for r in refs)
    for name in ("a|b||c", "$$", r"$\undefined$ $x^$"):
        assert f"<td>{html.escape(name)}</td>" in page


class _Collect(HTMLParser):
    """Tags, attributes and the text of every table cell of rendered Markdown."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self.h1 = ""
        self.text = ""
        self._cell: str | None = None
        self._in_h1 = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "h1":
            self._in_h1 = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None
        elif tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        self.text += data
        if self._cell is not None:
            self._cell += data
        if self._in_h1:
            self.h1 += data


def _render(md: str) -> _Collect:
    markdown_it = pytest.importorskip("markdown_it")
    page = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)
    c = _Collect()
    c.feed(page)
    return c


def test_hostile_markdown_renders_as_the_plain_text(hostile_report):
    out, title = hostile_report
    c = _render(out["md"].read_text())
    allowed = {
        "h1",
        "h2",
        "p",
        "ul",
        "li",
        "strong",
        "em",
        "img",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
    }
    assert {t for t, _ in c.tags} <= allowed  # no script, a, code, s, html blocks
    assert sorted(a["src"] for t, a in c.tags if t == "img") == [
        "passk.png",
        "passk_steps.png",
        "styles.png",
        "training.png",
    ]
    assert c.h1 == title
    methods = {row[1] for row in c.rows if row and row[0] in {one_line(d) for d in DATASETS}}
    assert methods == {one_line(n) for n in HOSTILE} | {"base"}
    header = next(row for row in c.rows if row[:2] == ["dataset", "method"] and row[-1] == "eff. styles")
    assert {f"{s} %" for s in STYLES} <= set(header)  # style names (model output) verbatim in the header


@pytest.mark.parametrize("text", HOSTILE + ["- item", "1. one", "+ x", "=== ", "> q", "---", "\x00nul", "\\"])
def test_md_escape_round_trips_through_a_renderer(text):
    want = one_line(text).strip()
    esc = rp.md_escape(text)
    assert "\n" not in esc and "<" not in esc
    cell = _render(f"| h | x |\n|---|---|\n| {esc} | z |\n")
    assert cell.rows[1] == [want, "z"]
    item = _render("- " + rp.md_escape(text, line_start=True))
    assert [t for t, _ in item.tags] == ["ul", "li"]  # one plain list item: nothing nested, no markup
    assert item.text.strip() == want


def test_failed_plots_are_named_and_the_report_is_still_written(tmp_path, monkeypatch):
    plt = plots._plt()
    before = plt.get_fignums()
    run = write(tmp_path / "r", results(0.4, 0.6, "m"), eval_log())
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "training.png").write_bytes(PNG)  # stale file of an earlier report

    def boom(*a, **k):
        raise ValueError("boom $x^$\n<b>second</b> | line")

    monkeypatch.setattr(rp, "plot_training", boom)
    out = write_report({"m|x": run}, tmp_path / "rep")
    assert "training" not in out and not (tmp_path / "rep" / "training.png").exists()
    assert {"md", "html", "passk", "styles", "passk_steps"} <= set(out)
    md, page = out["md"].read_text(), out["html"].read_text()
    assert (
        "- Plot training.png could not be drawn: ValueError: boom \\$x^\\$ &lt;b&gt;second&lt;/b&gt; \\| line"
        in md
    )
    assert html.escape("Plot training.png could not be drawn: ValueError: boom $x^$\n<b>second</b>") in page
    assert "| m\\|x |" in md and "(passk.png)" in md

    # a failure inside the drawing (after the figure exists): every plot fails, no figure leaks
    monkeypatch.setattr(plots, "_save", boom)  # the plots module draws (and saves) every figure
    out = write_report({"m|x": run}, tmp_path / "rep2")
    assert set(out) == {"md", "html"} and plt.get_fignums() == before
    assert out["md"].read_text().count("could not be drawn") == 4
