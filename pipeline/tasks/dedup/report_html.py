"""The dedup job's HTML report: one self-contained page rendered from ``report.json`` and a sample of groups.

Pure and standard-library only: no I/O, no scripts, no external references (inline CSS and inline SVG; a
Content-Security-Policy forbids fetching anything and running any script, so even a text that escaped
escaping could not execute). Every field of the inputs may be absent, empty or of the wrong type; the page
still renders, showing "—" where a value is missing.

Stable hooks for tools and tests: ``id="headline"`` (the ``.stat`` figures, each with ``data-value``),
``id="threshold-curve"`` (line chart), ``class="histogram"`` (``#score-to-kept-histogram``,
``#pair-score-histogram``, ``#group-size-histogram``), ``id="largest-groups"`` / ``id="random-groups"``
holding ``article.group`` (``data-group-id``, ``data-kind``, ``data-size``), whose rows are ``tr.member`` and
``tr.member.kept`` for the kept row (with a ``.badge-kept`` "kept" badge).
"""

from __future__ import annotations

import difflib
import html
import math
import re
import unicodedata

TEXT_DISPLAY_CHARS = 480  # a member's text is cut here in the table (an ellipsis marks the cut)
TEXT_TITLE_CHARS = 2000  # ... and here in its tooltip
DIFF_MIN_RATIO = 0.4  # words differing from the kept row are highlighted when the texts are this alike
MISSING = "—"

# C0/C1 controls (bar tab, newline, carriage return) and lone surrogates: not representable in a page that
# has to be written out as UTF-8, or parse errors in HTML.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_WORDS = re.compile(r"(\s+)")


# ---------------------------------------------------------------- values


def _clean(value: object) -> str:
    return _UNPRINTABLE.sub("\ufffd", str(value))


def _esc(value: object) -> str:
    return html.escape(_clean(value), quote=True)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt_num(value: object, places: int = 4) -> str:
    """Integers with thousands separators; floats to at most ``places`` decimals, trailing zeros dropped."""
    if not _is_num(value):
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    text = f"{value:,.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _fmt_fixed(value: object, places: int) -> str:
    return f"{value:.{places}f}" if _is_num(value) else MISSING


def _fmt_text(value: object) -> str:
    if value is None or value == "" or isinstance(value, (dict, list)):
        return MISSING
    return _esc(value)


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


# ---------------------------------------------------------------- scales and ticks


def _nice_step(span: float, count: int, integer: bool = False) -> float:
    raw = span / max(count, 1)
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for mantissa in (1, 2, 2.5, 5, 10):
        step = mantissa * magnitude
        if step >= raw * (1 - 1e-9) and not (integer and step != int(step)):
            return step
    return max(1.0, 10 * magnitude)


def _decimals(step: float) -> int:
    if step >= 1:
        return 0
    places = math.ceil(-math.log10(step) - 1e-9)
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-12)
    return places + (1 if abs(mantissa - round(mantissa)) > 1e-6 else 0)


def _ticks(lo: float, hi: float, count: int, integer: bool = False) -> tuple[list[float], int]:
    """Round tick values within [lo, hi], and how many decimals to print them with."""
    step = _nice_step(hi - lo, count, integer)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(round(k * step, 12))
        k += 1
    return ticks, _decimals(step)


def _y_axis(top_value: float) -> tuple[float, list[float], int]:
    """A count axis from 0: its top (a round number at or above the largest value) and its ticks."""
    top_value = max(float(top_value), 0.0)
    if top_value <= 0:
        return 1.0, [0.0, 1.0], 0
    step = _nice_step(top_value, 4, integer=True)
    top = math.ceil(top_value / step - 1e-9) * step
    ticks, places = _ticks(0, top, 4, integer=True)
    return top, ticks, places


def _tick_label(value: float, places: int) -> str:
    text = f"{value:,.{places}f}"
    return "0" if text.strip("-0.,") == "" else text


class _Scale:
    def __init__(self, lo: float, hi: float, out_lo: float, out_hi: float):
        self.lo, self.hi, self.out_lo, self.out_hi = lo, hi, out_lo, out_hi

    def __call__(self, value: float) -> float:
        span = self.hi - self.lo
        fraction = (value - self.lo) / span if span else 0.5
        return round(self.out_lo + fraction * (self.out_hi - self.out_lo), 2)


# ---------------------------------------------------------------- SVG charts


def _empty_chart(message: str) -> str:
    return f'<p class="empty">{_esc(message)}</p>'


def _svg_open(width: int, height: int, label: str) -> str:
    # no xmlns: inline SVG in HTML does not need one (and the page stays free of any http URL)
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{_esc(label)}" preserveAspectRatio="xMidYMid meet">'
    )


def _y_grid(y: _Scale, ticks: list[float], places: int, left: float, right: float) -> list[str]:
    parts = []
    for tick in ticks:
        py = y(tick)
        parts.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{py}" y2="{py}"/>')
        parts.append(
            f'<text class="tick" x="{left - 8}" y="{py}" text-anchor="end" dominant-baseline="middle">'
            f"{_tick_label(tick, places)}</text>"
        )
    return parts


def _axis_titles(
    x_title: str, y_title: str, left: float, right: float, top: float, bottom: float
) -> list[str]:
    middle_y = round((top + bottom) / 2, 1)
    return [
        f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>',
        f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{bottom}"/>',
        f'<text class="axis-title" x="{round((left + right) / 2, 1)}" y="{bottom + 42}" '
        f'text-anchor="middle">{_esc(x_title)}</text>',
        f'<text class="axis-title" x="16" y="{middle_y}" text-anchor="middle" '
        f'transform="rotate(-90 16 {middle_y})">{_esc(y_title)}</text>',
    ]


def _curve_points(curve: object) -> list[tuple[float, float, object]]:
    points = []
    for entry in _list(curve):
        entry = _dict(entry)
        threshold, removed = entry.get("threshold"), entry.get("rows_removed")
        if _is_num(threshold) and _is_num(removed):
            points.append((float(threshold), float(removed), entry.get("groups")))
    return sorted(points, key=lambda p: p[0])


def _interpolate(points: list[tuple[float, float, object]], x: float) -> float | None:
    for (x0, y0, _), (x1, y1, _) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    for px, py, _ in points:
        if px == x:
            return py
    return None


def _threshold_curve(report: dict) -> str:
    points = _curve_points(report.get("threshold_curve"))
    threshold = report.get("threshold") if _is_num(report.get("threshold")) else None
    target = _dict(report.get("target"))
    target_threshold = target.get("threshold") if _is_num(target.get("threshold")) else None
    if not points:
        return _empty_chart("No threshold curve in this report.")

    width, height = 960, 360
    left, right, top, bottom = 84, width - 28, 34, height - 58
    xs = [p[0] for p in points] + [v for v in (threshold, target_threshold) if v is not None]
    lo, hi = min(xs), max(xs)
    span = hi - lo if hi > lo else max(abs(lo) * 0.02, 0.01)
    lo, hi = lo - span * 0.04, hi + span * 0.04
    x = _Scale(lo, hi, left, right)
    y_top, y_ticks, y_places = _y_axis(max(p[1] for p in points))
    y = _Scale(0, y_top, bottom, top)
    x_ticks, x_places = _ticks(lo, hi, 8)

    parts = [_svg_open(width, height, "Rows removed at each similarity threshold")]
    parts += _y_grid(y, y_ticks, y_places, left, right)
    for tick in x_ticks:
        px = x(tick)
        parts.append(f'<line class="tick-mark" x1="{px}" x2="{px}" y1="{bottom}" y2="{bottom + 5}"/>')
        parts.append(
            f'<text class="tick" x="{px}" y="{bottom + 19}" text-anchor="middle">'
            f"{_tick_label(tick, x_places)}</text>"
        )
    parts += _axis_titles("similarity threshold", "rows removed", left, right, top, bottom)

    line = " ".join(f"{x(px)},{y(py)}" for px, py, _ in points)
    if len(points) > 1:
        area = f"{x(points[0][0])},{y(0)} {line} {x(points[-1][0])},{y(0)}"
        parts.append(f'<polygon class="area" points="{area}"/>')
        parts.append(f'<polyline class="line" points="{line}"/>')
    radius = 3.5 if len(points) <= 40 else 2
    for px, py, groups in points:
        tip = f"threshold {_fmt_num(px, 6)}: {_fmt_num(int(py))} rows removed"
        if _is_num(groups):
            tip += f", {_fmt_num(groups)} groups"
        parts.append(
            f'<circle class="point" cx="{x(px)}" cy="{y(py)}" r="{radius}" '
            f'data-threshold="{px!r}" data-rows-removed="{py!r}"><title>{_esc(tip)}</title></circle>'
        )

    def marker(value: float, label: str, css: str, at: float | None) -> None:
        px = x(value)
        anchor, dx = ("end", -6) if px > (left + right) / 2 else ("start", 6)
        parts.append(
            f'<g class="marker {css}" data-threshold="{value!r}">'
            f'<line x1="{px}" x2="{px}" y1="{top - 6}" y2="{bottom}"/>'
            f'<text x="{px + dx}" y="{top + 6}" text-anchor="{anchor}">{_esc(label)}</text>'
        )
        if at is not None:
            py = y(at)
            parts.append(f'<circle cx="{px}" cy="{py}" r="6"/>')
            parts.append(
                f'<text class="value" x="{px + dx}" y="{py - 10 if py > top + 30 else py + 20}" '
                f'text-anchor="{anchor}">{_esc(_fmt_num(round(at)))} rows removed</text>'
            )
        parts.append("</g>")

    same = (
        target_threshold is not None and threshold is not None and abs(target_threshold - threshold) < 1e-12
    )
    if target_threshold is not None and not same:
        marker(target_threshold, f"target {_fmt_num(target_threshold, 6)}", "target", None)
    if threshold is not None:
        removed = report.get("removed")
        at = float(removed) if _is_num(removed) else _interpolate(points, threshold)
        label = f"threshold {_fmt_num(threshold, 6)}" + (" (from target)" if same else "")
        marker(threshold, label, "chosen", at)
    parts.append("</svg>")
    return "".join(parts)


def _edge_labels(edges: list[float]) -> list[str]:
    """The fewest decimals (2 to 6) that tell adjacent edges apart."""
    labels: list[str] = []
    for places in range(2, 7):
        labels = [f"{e:.{places}f}" for e in edges]
        if len(set(labels)) == len(labels):
            break
    return labels


def _bar_chart(
    bars: list[tuple[str, float, str]],
    axis_labels: list[str],
    on_edges: bool,
    x_title: str,
    y_title: str,
    label: str,
) -> str:
    """Bars in equal slots. ``bars``: (tooltip, count, css). ``axis_labels``: one per slot boundary
    (``on_edges``: a histogram's bin edges) or one per slot (categories)."""
    width, height = 520, 300
    left, right, top, bottom = 70, width - 20, 22, height - 60
    slot = (right - left) / len(bars)
    y_top, y_ticks, y_places = _y_axis(max(b[1] for b in bars))
    y = _Scale(0, y_top, bottom, top)
    parts = [_svg_open(width, height, label)]
    parts += _y_grid(y, y_ticks, y_places, left, right)

    widest = max((len(t) for t in axis_labels), default=1) * 6.6 + 8
    stride = max(1, math.ceil(widest / slot))
    for i, text in enumerate(axis_labels):
        if i % stride and not (on_edges and i == len(axis_labels) - 1 and i % stride == 0):
            continue
        px = round(left + slot * i if on_edges else left + slot * (i + 0.5), 2)
        parts.append(f'<line class="tick-mark" x1="{px}" x2="{px}" y1="{bottom}" y2="{bottom + 5}"/>')
        parts.append(
            f'<text class="tick" x="{px}" y="{bottom + 19}" text-anchor="middle">{_esc(text)}</text>'
        )

    gap = min(6.0, slot * 0.15)
    for i, (tip, count, css) in enumerate(bars):
        x0 = round(left + slot * i + gap / 2, 2)
        bar_height = bottom - y(count)
        if count > 0:
            bar_height = max(bar_height, 1.5)
        py = round(bottom - bar_height, 2)
        parts.append(
            f'<rect class="bar {css}" x="{x0}" y="{py}" width="{round(slot - gap, 2)}" '
            f'height="{round(bar_height, 2)}" data-count="{count!r}"><title>{_esc(tip)}</title></rect>'
        )
        value = _fmt_num(int(count) if float(count).is_integer() else count)
        if count > 0 and len(value) * 6.2 < slot:
            parts.append(
                f'<text class="bar-value" x="{round(x0 + (slot - gap) / 2, 2)}" y="{py - 5}" '
                f'text-anchor="middle">{value}</text>'
            )
    parts += _axis_titles(x_title, y_title, left, right, top, bottom)
    parts.append("</svg>")
    return "".join(parts)


def _score_histogram(histogram: object, x_title: str, y_title: str, label: str, empty: str) -> str:
    histogram = _dict(histogram)
    edges, counts = _list(histogram.get("edges")), _list(histogram.get("counts"))
    if (
        not counts
        or len(edges) != len(counts) + 1
        or not all(_is_num(e) for e in edges)
        or not all(_is_num(c) and c >= 0 for c in counts)
    ):
        return _empty_chart(empty)
    labels = _edge_labels([float(e) for e in edges])
    bars = [
        (f"{edges[i]:.4f} to {edges[i + 1]:.4f}: {_fmt_num(c)}", float(c), "") for i, c in enumerate(counts)
    ]
    return _bar_chart(bars, labels, True, x_title, y_title, label)


def _size_histogram(histogram: object) -> str:
    buckets = [(str(k), v) for k, v in _dict(histogram).items() if _is_num(v) and v >= 0]
    if not buckets:
        return _empty_chart("No groups.")
    bars = [(f"{k} rows: {_fmt_num(v)} groups", float(v), "") for k, v in buckets]
    return _bar_chart(
        bars, [k for k, _ in buckets], False, "group size (rows)", "groups", "Groups by size (rows per group)"
    )


# ---------------------------------------------------------------- page parts


def _stat(key: str, title: str, value: object, shown: str, note: str = "") -> str:
    data = f' data-value="{_esc(value)}"' if _is_num(value) or isinstance(value, str) else ""
    note_html = f'<span class="note">{note}</span>' if note else ""
    return (
        f'<div class="stat" id="stat-{key}"{data}><dt>{_esc(title)}</dt>'
        f'<dd><span class="figure">{shown}</span>{note_html}</dd></div>'
    )


def _headline(report: dict) -> str:
    rows_in, removed = report.get("rows_in"), report.get("removed")
    share = ""
    if _is_num(rows_in) and _is_num(removed) and rows_in > 0:
        share = f"{100 * removed / rows_in:.2f}% of rows"
    largest = report.get("largest_group")
    groups_note = f"largest: {_fmt_num(largest)} rows" if _is_num(largest) else ""
    floor = report.get("pairs_floor")
    threshold_note = f"pairs floor {_fmt_num(floor, 6)}" if _is_num(floor) else ""
    stats = [
        _stat("rows-in", "Rows in", rows_in, _fmt_num(rows_in)),
        _stat("rows-out", "Rows out", report.get("rows_out"), _fmt_num(report.get("rows_out"))),
        _stat("removed", "Removed", removed, _fmt_num(removed), share),
        _stat("groups", "Groups", report.get("groups"), _fmt_num(report.get("groups")), _esc(groups_note)),
        _stat(
            "threshold",
            "Threshold",
            report.get("threshold"),
            _fmt_num(report.get("threshold"), 6),
            threshold_note,
        ),
        _stat(
            "similarity",
            "Similarity",
            report.get("similarity_fn_name"),
            _fmt_text(report.get("similarity_fn_name")),
        ),
        _stat("keep", "Keep policy", report.get("keep"), _fmt_text(report.get("keep"))),
        _stat("mode", "Mode", report.get("mode"), _fmt_text(report.get("mode"))),
    ]
    return f'<dl class="stats" id="headline">{"".join(stats)}</dl>'


def _callouts(report: dict) -> str:
    items = []
    target = _dict(report.get("target"))
    if target:
        wanted = []
        if _is_num(target.get("rows")):
            wanted.append(f"{_fmt_num(target['rows'])} rows")
        if _is_num(target.get("fraction")):
            wanted.append(f"a fraction of {_fmt_num(target['fraction'], 6)}")
        aim = " / ".join(wanted) or "a target"
        items.append(
            f'<li id="target">Threshold <strong>{_fmt_num(target.get("threshold"), 6)}</strong> was chosen '
            f"to remove {aim}.</li>"
        )
    collapsed = _dict(report.get("collapsed"))
    if collapsed:
        items.append(
            f'<li id="collapsed">Identical rows collapsed before scoring: '
            f"<strong>{_fmt_num(collapsed.get('identical_sets'))}</strong> sets of identical rows, "
            f"<strong>{_fmt_num(collapsed.get('rows_collapsed'))}</strong> rows.</li>"
        )
    against = _dict(report.get("against"))
    if against:
        references = [f"<code>{_esc(r)}</code>" for r in _list(against.get("references"))]
        listed = ", ".join(references) if references else MISSING
        items.append(
            f'<li id="against">Decontamination against {len(references)} reference(s) ({listed}): '
            f"<strong>{_fmt_num(against.get('removed'))}</strong> rows removed.</li>"
        )
    return f'<ul class="callouts">{"".join(items)}</ul>' if items else ""


_DETAIL_KEYS = [
    ("source", "Source"),
    ("from_pairs", "Re-grouped from"),
    ("pairs_floor", "Pairs floor"),
    ("largest_group", "Largest group"),
    ("pairs_at_threshold", "Pairs at threshold"),
    ("pairs_stored", "Pairs stored"),
    ("workers", "Workers"),
    ("actors_replaced", "Actors replaced"),
]


def _details(report: dict) -> str:
    rows = []
    for key, title in _DETAIL_KEYS:
        value = report.get(key)
        if _is_num(value):
            rows.append((title, _fmt_num(value, 6)))
        elif isinstance(value, str) and value:
            rows.append((title, f"<bdi>{_esc(value)}</bdi>"))
    recall = _dict(report.get("partitioned")).get("recall_vs_exact")
    recall = _dict(recall).get("recall") if isinstance(recall, dict) else recall
    if _is_num(recall):
        rows.append(("Recall vs exact (sampled)", _fmt_num(recall, 4)))
    for key, value in _dict(report.get("timings")).items():
        if _is_num(value):
            name = str(key).removesuffix("_seconds").replace("_", " ")
            rows.append((f"Time: {name}", f"{_fmt_num(float(value), 3)} s"))
    if not rows:
        return _empty_chart("No run details.")
    body = "".join(f"<tr><th scope='row'>{_esc(t)}</th><td>{v}</td></tr>" for t, v in rows)
    return f'<table class="details" id="run-details"><tbody>{body}</tbody></table>'


# ---------------------------------------------------------------- groups


def _cut(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to about ``limit`` characters, at a space when one is near, never inside a
    combining sequence or an emoji sequence (ZWJ, variation selector, skin tone)."""
    if len(text) <= limit:
        return text, False
    cut = limit
    space = text.rfind(" ", limit - 40, limit)
    if space > 0:
        cut = space

    def joined(i: int) -> bool:
        ch, before = text[i], text[i - 1]
        return (
            unicodedata.combining(ch) > 0
            or ch in "\u200d\ufe0e\ufe0f"
            or before == "\u200d"
            or 0x1F3FB <= ord(ch) <= 0x1F3FF
            or 0xE0020 <= ord(ch) <= 0xE007F
        )

    while cut > 1 and joined(cut):
        cut -= 1
    return text[:cut].rstrip(), True


def _diff_html(text: str, kept: str | None) -> str:
    """``text`` escaped, its words that differ from ``kept`` wrapped in ``<mark>``."""
    if kept is None or text == kept:
        return _esc(text)
    ours, theirs = _WORDS.split(text), _WORDS.split(kept)
    matcher = difflib.SequenceMatcher(None, theirs, ours, autojunk=False)
    if matcher.ratio() < DIFF_MIN_RATIO:  # mostly different: highlighting every word says nothing
        return _esc(text)
    parts = []
    for op, _, _, j1, j2 in matcher.get_opcodes():
        chunk = _esc("".join(ours[j1:j2]))
        if op == "equal" or not "".join(ours[j1:j2]).strip():
            parts.append(chunk)
        else:
            parts.append(f'<mark class="diff">{chunk}</mark>')
    return "".join(parts)


def _text_cell(text: object, kept_text: str | None, is_kept: bool) -> str:
    if text is None or not isinstance(text, str):
        shown = MISSING if text is None else _clean(text)
        return f'<td class="text missing">{_esc(shown) if text is not None else "no text"}</td>'
    text = _clean(text)
    shown, truncated = _cut(text, TEXT_DISPLAY_CHARS)
    body = _esc(shown) if is_kept else _diff_html(shown, kept_text)
    if truncated:
        body += f'<span class="ellipsis">…</span><span class="length">({len(text):,} chars)</span>'
    tip = _cut(text, TEXT_TITLE_CHARS)[0] + ("…" if len(text) > TEXT_TITLE_CHARS else "")
    same = ' <span class="badge badge-same">identical</span>' if not is_kept and text == kept_text else ""
    return f'<td class="text" dir="auto" title="{_esc(tip)}">{body}{same}</td>'


def _score_range(members: list[dict]) -> str:
    scores = [m.get("score") for m in members if not m.get("kept") and _is_num(m.get("score"))]
    if not scores:
        return ""
    low, high = min(scores), max(scores)
    if low == high:
        return f"score {low:.4f}"
    return f"scores {low:.4f} to {high:.4f}"


def _group(group: dict) -> str:
    members = [m for m in _list(group.get("members")) if isinstance(m, dict)]
    size = group.get("size")
    size = size if _is_num(size) else len(members)
    kept_members = [m for m in members if m.get("kept") is True]
    kept_text = kept_members[0].get("text") if kept_members else None
    kept_text = _clean(kept_text) if isinstance(kept_text, str) else None
    if kept_text is not None:
        kept_text = _cut(kept_text, TEXT_DISPLAY_CHARS)[0]

    def order(m: dict) -> tuple:
        score = m.get("score")
        return (m.get("kept") is not True, -score if _is_num(score) else math.inf)

    rows = []
    for member in sorted(members, key=order):
        is_kept = member.get("kept") is True
        status = (
            '<span class="badge badge-kept">kept</span>'
            if is_kept
            else '<span class="badge badge-removed">removed</span>'
        )
        score = member.get("score")
        rows.append(
            f'<tr class="member {"kept" if is_kept else "removed"}">'
            f'<td class="status">{status}</td>'
            f'<td class="id"><bdi>{_fmt_text(member.get("id"))}</bdi></td>'
            f'<td class="num score" data-score="{_esc(score) if _is_num(score) else ""}">'
            f"{_fmt_fixed(score, 4)}</td>"
            f"{_text_cell(member.get('text'), kept_text if not is_kept else None, is_kept)}</tr>"
        )
    if not rows:
        rows.append('<tr class="empty-row"><td colspan="4">No members in this sample.</td></tr>')
    hidden = int(size) - len(members) if _is_num(size) else 0
    foot = (
        f'<tfoot><tr><td colspan="4">… and {hidden:,} more row{"s" if hidden != 1 else ""} '
        f"not shown</td></tr></tfoot>"
        if hidden > 0
        else ""
    )
    group_id = group.get("group_id")
    name = _fmt_num(group_id) if _is_num(group_id) else _fmt_text(group_id)
    meta = [f"{_fmt_num(size)} rows"]
    removed_shown = sum(1 for m in members if m.get("kept") is not True)
    if _is_num(size) and kept_members:
        meta.append(f"{_fmt_num(int(size) - len(kept_members))} removed")
    elif removed_shown:
        meta.append(f"{removed_shown} removed shown")
    score_range = _score_range(members)
    if score_range:
        meta.append(score_range)
    kind = group.get("kind") if isinstance(group.get("kind"), str) else ""
    return (
        f'<article class="group" data-group-id="{_esc(group_id) if group_id is not None else ""}" '
        f'data-kind="{_esc(kind)}" data-size="{_esc(size)}">'
        f'<header><h3>Group {name}</h3><span class="meta">{_esc(" · ".join(meta))}</span></header>'
        f'<div class="table-wrap"><table class="members">'
        f'<colgroup><col class="c-status"><col class="c-id"><col class="c-score"><col class="c-text"></colgroup>'
        f'<thead><tr><th scope="col">Status</th><th scope="col">ID</th>'
        f'<th scope="col" class="num">Score to kept</th><th scope="col">Text</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody>{foot}</table></div></article>"
    )


def _groups(groups: object) -> str:
    kinds: dict[str, list[dict]] = {"largest": [], "random": [], "other": []}
    for group in _list(groups):
        if isinstance(group, dict):
            kind = group.get("kind")
            kinds[kind if kind in ("largest", "random") else "other"].append(group)
    sections = []
    titles = [
        ("largest", "Largest groups", "The groups with the most rows."),
        ("random", "Random groups", "A random sample of groups."),
        ("other", "Other groups", "Sampled groups of no stated kind."),
    ]
    for kind, title, blurb in titles:
        if kind == "other" and not kinds["other"]:
            continue
        body = "".join(_group(g) for g in kinds[kind]) or _empty_chart("No groups in this sample.")
        sections.append(
            f'<section class="groups" id="{kind}-groups"><h2>{title}</h2>'
            f'<p class="sub">{blurb} The kept row comes first; '
            f'<mark class="diff">highlighted</mark> words differ from it.</p>{body}</section>'
        )
    return "".join(sections)


# ---------------------------------------------------------------- the page

_CSS = """
:root{--fg:#0f172a;--muted:#64748b;--line:#e2e8f0;--bg:#f8fafc;--card:#fff;--accent:#2563eb;
--accent-soft:#dbeafe;--kept:#047857;--kept-bg:#ecfdf5;--kept-line:#6ee7b7;--chosen:#dc2626;--target:#7c3aed}
*{box-sizing:border-box}
html{background:var(--bg)}
body{margin:0 auto;max-width:1160px;padding:32px 28px 48px;color:var(--fg);
font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",
"Apple Color Emoji","Segoe UI Emoji","Noto Color Emoji",sans-serif}
h1{font-size:26px;margin:0 0 2px;letter-spacing:-.01em}
h2{font-size:18px;margin:0 0 4px}
h3{font-size:15px;margin:0}
.eyebrow{text-transform:uppercase;letter-spacing:.08em;font-size:11px;font-weight:600;color:var(--accent)}
.source{margin:0 0 20px;color:var(--muted);overflow-wrap:anywhere}
.sub{margin:0 0 14px;color:var(--muted)}
code,.id{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:12.5px}
.stats{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:12px;margin:0}
.stat{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 16px;min-width:0}
.stat dt{font-size:12px;color:var(--muted);font-weight:500}
.stat dd{margin:2px 0 0}
.stat .figure{display:block;font-size:22px;font-weight:650;font-variant-numeric:tabular-nums;
overflow-wrap:anywhere}
.stat .note{display:block;font-size:12px;color:var(--muted)}
.callouts{list-style:none;padding:0;margin:14px 0 0}
.callouts li{background:var(--accent-soft);border-radius:8px;padding:8px 14px;margin-top:8px}
section{margin-top:34px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px}
.chart{margin:0}
.chart svg{display:block;width:100%;height:auto;overflow:visible}
.chart figcaption{margin-bottom:8px}
.chart figcaption h3{margin-bottom:2px}
.chart figcaption p{margin:0;color:var(--muted);font-size:13px}
.grid-2{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px}
.grid-2>*{min-width:0}
svg text{font-family:inherit}
svg .grid{stroke:var(--line);stroke-width:1}
svg .axis{stroke:#94a3b8;stroke-width:1}
svg .tick-mark{stroke:#94a3b8}
svg .tick{font-size:11.5px;fill:var(--muted);font-variant-numeric:tabular-nums}
svg .axis-title{font-size:12.5px;fill:#334155;font-weight:500}
svg .line{fill:none;stroke:var(--accent);stroke-width:2.25;stroke-linejoin:round}
svg .area{fill:var(--accent);fill-opacity:.08}
svg .point{fill:#fff;stroke:var(--accent);stroke-width:1.75}
svg .bar{fill:var(--accent);fill-opacity:.85}
svg .bar-value{font-size:10.5px;fill:#334155;font-variant-numeric:tabular-nums}
svg .marker line{stroke-width:1.5;stroke-dasharray:5 4}
svg .marker text{font-size:12px;font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:4px;
stroke-linejoin:round}
svg .marker.chosen line{stroke:var(--chosen)}
svg .marker.chosen text{fill:var(--chosen)}
svg .marker.chosen circle{fill:var(--chosen);stroke:#fff;stroke-width:2}
svg .marker.target line{stroke:var(--target)}
svg .marker.target text{fill:var(--target)}
.empty{color:var(--muted);font-style:italic;margin:8px 0;padding:18px;border:1px dashed var(--line);
border-radius:8px;text-align:center}
table{border-collapse:collapse;width:100%}
.details th,.details td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);
vertical-align:top;overflow-wrap:anywhere}
.details th{font-weight:500;color:var(--muted);width:44%}
.details td{font-variant-numeric:tabular-nums}
.group{background:var(--card);border:1px solid var(--line);border-radius:10px;margin-top:14px;overflow:hidden}
.group>header{display:flex;flex-wrap:wrap;align-items:baseline;gap:6px 14px;padding:10px 16px;
border-bottom:1px solid var(--line);background:#f1f5f9}
.group .meta{color:var(--muted);font-size:13px}
.members{table-layout:fixed}
.members col.c-status{width:92px}.members col.c-id{width:150px}.members col.c-score{width:136px}
.members th{text-align:left;font-size:11.5px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);
font-weight:600;padding:8px 12px;border-bottom:1px solid var(--line);white-space:nowrap}
.members td{padding:8px 12px;border-bottom:1px solid var(--line);vertical-align:top;overflow-wrap:anywhere}
.members tbody tr:last-child td{border-bottom:0}
.members .num{text-align:right;font-variant-numeric:tabular-nums}
.members td.text{white-space:pre-wrap;unicode-bidi:plaintext;text-align:start}
.members td.missing{color:var(--muted);font-style:italic}
.members tr.kept td{background:var(--kept-bg)}
.members tr.kept td:first-child{box-shadow:inset 4px 0 0 var(--kept)}
.members tfoot td{color:var(--muted);font-style:italic;background:#f8fafc;border-top:1px solid var(--line)}
.badge{display:inline-block;border-radius:999px;padding:1px 9px;font-size:11.5px;font-weight:600;
line-height:18px;white-space:nowrap}
.badge-kept{background:var(--kept);color:#fff}
.badge-removed{background:#f1f5f9;color:var(--muted);border:1px solid var(--line)}
.badge-same{background:#fef3c7;color:#92400e;font-weight:500}
mark.diff{background:#fef08a;color:inherit;border-radius:2px;padding:0 1px}
.ellipsis{color:var(--muted);font-weight:700}
.length{color:var(--muted);font-size:12px;white-space:nowrap;margin-left:.5em}
footer{margin-top:40px;color:var(--muted);font-size:12px;text-align:center}
@media (max-width:820px){.stats{grid-template-columns:repeat(2,minmax(0,1fr))}.grid-2{grid-template-columns:1fr}}
@media print{html{background:#fff}.group{break-inside:avoid}}
"""

# Nothing may be fetched and no script may run: the page is data only.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _figure(fid: str, title: str, blurb: str, body: str, css: str = "chart") -> str:
    return (
        f'<figure class="{css} card" id="{fid}"><figcaption><h3>{_esc(title)}</h3>'
        f"<p>{_esc(blurb)}</p></figcaption>{body}</figure>"
    )


def render_report(report: dict, groups: list[dict]) -> str:
    """One self-contained HTML page."""
    report = _dict(report)
    source = report.get("source")
    title = "Dedup report" + (f" — {_clean(source)}" if isinstance(source, str) and source else "")
    removed_blurb = "Rows the dedup would remove at each threshold; the chosen threshold is marked."
    curve = _figure(
        "threshold-curve",
        "Rows removed by threshold",
        removed_blurb,
        _threshold_curve(report),
        "chart line-chart",
    )
    kept_hist = _figure(
        "score-to-kept-histogram",
        "Score to the kept row",
        "Each removed row's similarity to the row kept in its group.",
        _score_histogram(
            report.get("score_to_kept_histogram"),
            "similarity to the kept row",
            "removed rows",
            "Histogram of removed rows' scores to the kept row",
            "No removed rows.",
        ),
        "chart histogram",
    )
    pair_hist = _figure(
        "pair-score-histogram",
        "Pair scores",
        "Similarity of every pair at or above the threshold.",
        _score_histogram(
            report.get("pair_score_histogram"),
            "pair similarity",
            "pairs",
            "Histogram of pair scores",
            "No pairs at the threshold.",
        ),
        "chart histogram",
    )
    size_hist = _figure(
        "group-size-histogram",
        "Group sizes",
        "How many groups have each number of rows.",
        _size_histogram(report.get("group_size_histogram")),
        "chart histogram",
    )
    details = (
        f'<div class="card"><h3>Run details</h3><p class="sub">Inputs, pair counts and timings.</p>'
        f"{_details(report)}</div>"
    )
    source_line = (
        f'<p class="source"><bdi>{_esc(source)}</bdi></p>' if isinstance(source, str) and source else ""
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="color-scheme" content="light">'
        '<link rel="icon" href="data:,">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        '<body><header class="page-header"><div class="eyebrow">embedpipe · dedup</div>'
        f"<h1>Dedup report</h1>{source_line or '<p class=source></p>'}"
        f"{_headline(report)}{_callouts(report)}</header>"
        f'<main><section id="threshold">{curve}</section>'
        f'<section id="scores"><h2>Score distributions</h2><div class="grid-2">{kept_hist}{pair_hist}</div></section>'
        f'<section id="sizes"><h2>Groups</h2><div class="grid-2">{size_hist}{details}</div></section>'
        f"{_groups(groups)}</main>"
        "<footer>Generated by embedpipe. A self-contained page: no scripts, no external resources.</footer>"
        "</body></html>\n"
    )
