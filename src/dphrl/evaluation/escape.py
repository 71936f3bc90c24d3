"""Untrusted text (run, dataset and style names, config values) made safe for one line of a report.

Names come from users and from model output, so every report format escapes them: :func:`one_line`
for terminals and HTML cells (then ``html.escape``), :func:`md_escape` for Markdown.
"""

from __future__ import annotations

import re

_LINE_BREAKS = re.compile(r"\r\n|[\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# C0/C1 controls and the bidi controls (which would show a name reversed or reordered, "Trojan source")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Markdown/GFM inline syntax: escapes, code spans, emphasis, links/images, table cells, headings,
# strikethrough and GitHub math; ``<`` ``>`` ``&`` become entities (no raw HTML, autolinks or entities).
_MD_BACKSLASHED = set("\\`*_[]|#~$")
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def one_line(text: object) -> str:
    """``str(text)`` on one line: line breaks and tabs become spaces, other control and bidi
    control characters U+FFFD (visible, so a name cannot hide or reorder what follows)."""
    return _CONTROLS.sub("\ufffd", _LINE_BREAKS.sub(" ", str(text)))


def md_escape(text: object, *, line_start: bool = False) -> str:
    """Untrusted text -> Markdown (CommonMark/GFM) that renders as exactly that text, on one line.

    No HTML, links, autolinks, emphasis, code, math or table cell breaks can come out of it: it is
    safe in a table cell, a heading and inside ``**...**``. ``line_start`` also escapes what would
    open a block at the start of a line (list items, ``1.`` lists, setext underlines), for text that
    begins a list item. Line breaks become spaces (see :func:`one_line`).
    """
    s = "".join("\\" + c if c in _MD_BACKSLASHED else _MD_ENTITIES.get(c, c) for c in one_line(text))
    s = s.replace("://", "\\://")  # GFM bare-URL autolinks (http://, https://, ftp://)
    s = re.sub(r"(?i)\b(www)\.", r"\1\\.", s)  # GFM www. autolinks
    if line_start:
        s = s.lstrip(" ")
        if s[:1] in ("-", "+", "="):
            s = "\\" + s
        s = re.sub(r"^(\d{1,9})([.)])", r"\1\\\2", s)
    return s
