"""The dedup job's HTML report (``pipeline.tasks.dedup.report_html.render_report``).

Unit tests parse the page with the standard library's HTML parser into a small tree and look at what a
reader would see: every headline number, the charts' marks, the groups with the kept row marked, hostile
texts staying text. Then the same page goes through a real headless Chromium (skipped when no Chromium is
installed; ``apt-get install -y chromium``): its rendered DOM, a screenshot decoded here and checked for the
colours of what it must show, and its console (which must stay silent; a control run shows that the console
is seen and that the page's Content-Security-Policy blocks an injected script).
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline.tasks.dedup.report_html import TEXT_DISPLAY_CHARS, render_report

# ---------------------------------------------------------------- a small DOM

VOID = {"meta", "link", "br", "hr", "img", "input", "col", "area", "base", "embed", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: list[tuple[str, str | None]], parent: Node | None):
        self.tag, self.attrs, self.parent = tag, {k: v or "" for k, v in attrs}, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.classes)
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def by_id(self, element_id: str) -> Node:
        found = [n for n in self.iter() if n.attrs.get("id") == element_id]
        assert len(found) == 1, f"{len(found)} elements with id={element_id!r}"
        return found[0]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def own_text(self) -> str:
        return "".join(c for c in self.children if isinstance(c, str))


class TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", [], None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, attrs, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    return builder.root


# ---------------------------------------------------------------- inputs

HOSTILE = [
    "<script>alert('x')</script>",
    '"><img src=x onerror=alert(1)>',
    "</td></tr></table><h1>broken out</h1>",
    "<!-- open comment & &amp; &lt;",
    "]]></svg><svg onload=alert(1)>",
]
RTL = "مرحبا بالعالم، هذا نص عربي"
EMOJI = "family 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵 thumbs 👍🏽"
FOX = "The quick brown fox jumps over the lazy dog near the riverbank at dawn."
CURVE = [  # 1,234 rows removed at the chosen 0.92 (i = 12), as in the report below
    {
        "threshold": round(0.80 + 0.01 * i, 2),
        "rows_removed": 1234 + 300 * (12 - i) if i <= 12 else 1234 - 150 * (i - 12),
        "groups": 900 - 40 * i,
    }
    for i in range(21)
]


def sample_report(**changes) -> dict:
    report = {
        "rows_in": 120000,
        "rows_out": 118766,
        "removed": 1234,
        "groups": 811,
        "threshold": 0.92,
        "similarity_fn_name": "cosine",
        "keep": "longest",
        "mode": "exact",
        "pairs_floor": 0.85,
        "largest_group": 143,
        "source": "s3://corpora/web-2024/embeddings",
        "group_size_histogram": {"2": 612, "3": 120, "4": 41, "5-9": 30, "10-99": 7, "100+": 1},
        "score_to_kept_histogram": {
            "edges": [round(0.92 + 0.008 * i, 6) for i in range(11)],
            "counts": [210, 180, 150, 120, 90, 80, 70, 60, 94, 180],
        },
        "pair_score_histogram": {
            "edges": [round(0.92 + 0.008 * i, 6) for i in range(11)],
            "counts": [1210, 980, 750, 520, 390, 280, 170, 160, 194, 2180],
        },
        "threshold_curve": list(reversed(CURVE)),  # descending, as a job may write it
        "target": {"rows": 1200, "fraction": None, "threshold": 0.92},
        "collapsed": {"identical_sets": 17, "rows_collapsed": 52},
        "against": {"references": ["s3://bench/mteb-test", "s3://bench/beir"], "removed": 31},
        "pairs_at_threshold": 5432,
        "pairs_stored": 9876,
        "timings": {"pairs_seconds": 12.5, "grouping_seconds": 0.734, "total_seconds": 14.125},
    }
    report.update(changes)
    return report


def sample_groups() -> list[dict]:
    largest = [
        {"id": "doc-000123", "text": FOX, "score": None, "kept": True},
        {"id": "doc-000999", "text": FOX, "score": 1.0, "kept": False},
        {"id": "doc-004242", "text": FOX.replace("lazy", "sleepy"), "score": 0.98765, "kept": False},
        {"id": "rtl", "text": RTL, "score": 0.95, "kept": False},
        {"id": "emoji", "text": EMOJI, "score": 0.94, "kept": False},
        *(
            {"id": f"hostile-{i}", "text": t, "score": 0.93 - i / 1000, "kept": False}
            for i, t in enumerate(HOSTILE)
        ),
        {"id": "long", "text": "lorem ipsum dolor sit amet " * 600, "score": 0.9211, "kept": False},
        {"id": "none", "text": None, "score": None, "kept": False},
    ]
    return [
        {"group_id": 7, "size": 143, "kind": "largest", "members": largest},
        {
            "group_id": 12,
            "size": 3,
            "kind": "random",
            "members": [
                {"id": 56, "text": "Paris is the capital city of France.", "score": 0.9612, "kept": False},
                {"id": 55, "text": "Paris is the capital of France.", "score": None, "kept": True},
                {"id": 57, "text": "The capital of France is Paris.", "score": 0.9433, "kept": False},
            ],
        },
    ]


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(sample_report(), sample_groups())


@pytest.fixture(scope="module")
def dom(page: str) -> Node:
    return parse(page)


# ---------------------------------------------------------------- the page, parsed


def assert_self_contained(page: str) -> None:
    """No URL anywhere, no script, nothing loaded but data: URIs, and writable as UTF-8."""
    assert not re.search(r"https?:", page, re.I), "the page references a URL"
    assert not re.search(r"<script\b", page, re.I), "the page has a script element"
    assert "Content-Security-Policy" in page
    dom = parse(page)
    assert not dom.find_all("script")
    for node in dom.iter():
        for name, value in node.attrs.items():
            if name in ("src", "href", "xlink:href", "srcset", "action", "formaction"):
                assert value.startswith("data:"), f"<{node.tag} {name}={value!r}> loads a resource"
    for style in dom.find_all("style"):
        assert "url(" not in style.text() and "@import" not in style.text()
    page.encode("utf-8")  # writable as UTF-8 whatever the texts were


def test_headline_numbers(dom: Node):
    expected = {
        "stat-rows-in": ("120,000", "120000"),
        "stat-rows-out": ("118,766", "118766"),
        "stat-removed": ("1,234", "1234"),
        "stat-groups": ("811", "811"),
        "stat-threshold": ("0.92", "0.92"),
        "stat-similarity": ("cosine", "cosine"),
        "stat-keep": ("longest", "longest"),
        "stat-mode": ("exact", "exact"),
    }
    headline = dom.by_id("headline")
    for element_id, (shown, value) in expected.items():
        stat = headline.by_id(element_id)
        assert stat.find_all(cls="figure")[0].text() == shown, element_id
        assert stat.attrs["data-value"] == value, element_id
    assert "1.03% of rows" in dom.by_id("stat-removed").text()
    assert "largest: 143 rows" in dom.by_id("stat-groups").text()
    assert "pairs floor 0.85" in dom.by_id("stat-threshold").text()
    assert dom.find_all("title")[0].text() == "Dedup report — s3://corpora/web-2024/embeddings"


def test_every_number_appears(dom: Node):
    text = " ".join(dom.text().split())
    assert "Threshold 0.92 was chosen to remove 1,200 rows." in text
    assert "17 sets of identical rows, 52 rows" in text
    assert "2 reference(s) (s3://bench/mteb-test, s3://bench/beir): 31 rows removed" in text
    details = {
        tr.find_all("th")[0].text(): tr.find_all("td")[0].text()
        for tr in dom.by_id("run-details").find_all("tr")
    }
    assert details == {
        "Source": "s3://corpora/web-2024/embeddings",
        "Pairs floor": "0.85",
        "Largest group": "143",
        "Pairs at threshold": "5,432",
        "Pairs stored": "9,876",
        "Time: pairs": "12.5 s",
        "Time: grouping": "0.734 s",
        "Time: total": "14.125 s",
    }


def test_threshold_curve(dom: Node):
    chart = dom.by_id("threshold-curve")
    (svg,) = chart.find_all("svg")
    points = [
        (float(c.attrs["data-threshold"]), float(c.attrs["data-rows-removed"]))
        for c in svg.find_all(cls="point")
    ]
    assert points == sorted((p["threshold"], p["rows_removed"]) for p in CURVE)
    polyline = [
        tuple(map(float, xy.split(","))) for xy in svg.find_all("polyline")[0].attrs["points"].split()
    ]
    assert len(polyline) == len(CURVE)
    assert [x for x, _ in polyline] == sorted(x for x, _ in polyline), "x runs left to right"
    ys = [y for _, y in polyline]
    assert ys == sorted(ys), "fewer rows removed (lower on the chart) as the threshold rises"
    # the chosen threshold: a marker line, labelled, with the removed count
    (marker,) = svg.find_all("g", cls="chosen")
    assert float(marker.attrs["data-threshold"]) == 0.92
    assert "threshold 0.92 (from target)" in marker.text()
    assert "1,234 rows removed" in marker.text()
    ticks = [t.text() for t in svg.find_all("text", cls="tick")]
    assert {"0.80", "0.85", "0.90", "0.95", "1.00"} <= set(ticks)
    assert {"0", "2,000", "4,000"} <= set(ticks)
    titles = [t.text() for t in svg.find_all("text", cls="axis-title")]
    assert titles == ["similarity threshold", "rows removed"]


def test_histograms(dom: Node):
    report = sample_report()
    charts = dom.find_all("figure", cls="histogram")
    assert [c.attrs["id"] for c in charts] == [
        "score-to-kept-histogram",
        "pair-score-histogram",
        "group-size-histogram",
    ]
    for chart_id, key in [
        ("score-to-kept-histogram", "score_to_kept_histogram"),
        ("pair-score-histogram", "pair_score_histogram"),
    ]:
        svg = dom.by_id(chart_id).find_all("svg")[0]
        counts = [float(r.attrs["data-count"]) for r in svg.find_all("rect", cls="bar")]
        assert counts == report[key]["counts"]
        labels = [t.text() for t in svg.find_all("text", cls="tick")]
        assert "0.920" in labels and "1.000" in labels
        values = [t.text() for t in svg.find_all("text", cls="bar-value")]
        assert values == [f"{c:,}" for c in report[key]["counts"]]
        assert len(svg.find_all("text", cls="axis-title")) == 2
    sizes = dom.by_id("group-size-histogram").find_all("svg")[0]
    assert [float(r.attrs["data-count"]) for r in sizes.find_all("rect", cls="bar")] == [
        612,
        120,
        41,
        30,
        7,
        1,
    ]
    labels = [t.text() for t in sizes.find_all("text", cls="tick")]
    assert {"2", "3", "4", "5-9", "10-99", "100+"} <= set(labels)
    assert [t.text() for t in sizes.find_all("text", cls="axis-title")] == ["group size (rows)", "groups"]
    bars = sizes.find_all("rect", cls="bar")
    heights = [float(b.attrs["height"]) for b in bars]
    assert heights == sorted(heights, reverse=True) and heights[-1] >= 1.5, "a group of 1 is still visible"


def test_groups(dom: Node):
    largest, random_ = dom.by_id("largest-groups"), dom.by_id("random-groups")
    assert largest.find_all("h2")[0].text() == "Largest groups"
    assert random_.find_all("h2")[0].text() == "Random groups"
    (big,) = largest.find_all("article", cls="group")
    (small,) = random_.find_all("article", cls="group")
    assert (big.attrs["data-group-id"], big.attrs["data-kind"], big.attrs["data-size"]) == (
        "7",
        "largest",
        "143",
    )
    assert (small.attrs["data-group-id"], small.attrs["data-kind"], small.attrs["data-size"]) == (
        "12",
        "random",
        "3",
    )
    for group, kept_id in [(big, "doc-000123"), (small, "55")]:
        rows = group.find_all("tr", cls="member")
        kept = [r for r in rows if "kept" in r.classes]
        assert len(kept) == 1 and rows[0] is kept[0], "one kept row, listed first"
        assert kept[0].find_all(cls="badge-kept")[0].text() == "kept"
        assert kept[0].find_all("td", cls="id")[0].text() == kept_id
        assert all(r.find_all(cls="badge-removed") for r in rows[1:])
    scores = [td.text() for td in big.find_all("td", cls="score")]
    assert scores[:4] == ["—", "1.0000", "0.9877", "0.9500"]  # 4 decimals, best first after the kept row
    assert scores[-1] == "—"  # no score: listed last
    assert "143 rows · 142 removed · scores 0.9211 to 1.0000" in big.find_all("header")[0].text()
    assert "… and 131 more rows not shown" in big.find_all("tfoot")[0].text()
    assert not small.find_all("tfoot")
    # the identical copy is flagged; the changed word is highlighted, the rest is not
    copy, changed = big.find_all("tr", cls="member")[1:3]
    assert copy.find_all(cls="badge-same")[0].text() == "identical"
    assert [m.text() for m in changed.find_all("mark")] == ["sleepy"]
    # a text with no text
    assert big.find_all("td", cls="missing")[0].text() == "no text"


def test_texts_are_escaped(page: str, dom: Node):
    assert_self_contained(page)
    assert not dom.find_all("script") and not dom.find_all("img")
    assert len(dom.find_all("h1")) == 1 and len(dom.find_all("table", cls="members")) == 2
    assert not [n for n in dom.iter() if any(a.startswith("on") for a in n.attrs)], (
        "an event handler attribute"
    )
    cells = {
        r.find_all("td", cls="id")[0].text(): r.find_all("td", cls="text")[0]
        for r in dom.find_all("tr", cls="member")
    }
    for i, text in enumerate(HOSTILE):
        assert cells[f"hostile-{i}"].own_text() == text  # shown verbatim, as text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_hostile_fields_everywhere():
    """Every string the page shows, not just the texts: ids, group ids, the source, names, bucket labels."""
    evil = HOSTILE[0] + HOSTILE[1]
    report = sample_report(
        source=evil,
        similarity_fn_name=evil,
        keep=evil,
        mode=evil,
        group_size_histogram={evil: 3, "2": 1},
        against={"references": [evil], "removed": 1},
        timings={evil: 1.5},
    )
    groups = [
        {
            "group_id": evil,
            "size": 2,
            "kind": evil,
            "members": [{"id": evil, "text": evil, "score": 1, "kept": True}],
        }
    ]
    page = render_report(report, groups)
    assert_self_contained(page)
    dom = parse(page)
    assert not dom.find_all("script") and not dom.find_all("img")
    assert not [n for n in dom.iter() if any(a.startswith("on") for a in n.attrs)]
    assert dom.by_id("stat-similarity").find_all(cls="figure")[0].text() == evil
    assert dom.find_all("title")[0].text() == f"Dedup report — {evil}"
    (group,) = dom.by_id("other-groups").find_all("article", cls="group")
    assert group.attrs["data-group-id"] == evil and group.attrs["data-kind"] == evil


def test_long_rtl_emoji_and_control_texts():
    long_text = "word " * 3000
    cut_emoji = "x" * (TEXT_DISPLAY_CHARS - 2) + "👨\u200d👩\u200d👧\u200d👦" * 5
    combining = "e\u0301" * TEXT_DISPLAY_CHARS
    controls = "nul\x00 bell\x07 lone surrogate \ud800 end"
    members = [
        {"id": "k", "text": "kept", "score": None, "kept": True},
        *(
            {"id": name, "text": t, "score": 0.9, "kept": False}
            for name, t in [
                ("long", long_text),
                ("emoji", cut_emoji),
                ("combining", combining),
                ("controls", controls),
                ("rtl", RTL),
                ("emoji-short", EMOJI),
            ]
        ),
    ]
    page = render_report({}, [{"group_id": 1, "size": 7, "kind": "random", "members": members}])
    assert_self_contained(page)
    assert "\x00" not in page and "\ud800" not in page
    cells = {
        r.find_all("td", cls="id")[0].text(): r.find_all("td", cls="text")[0]
        for r in parse(page).find_all("tr", cls="member")
    }
    for name, original in [("long", long_text), ("emoji", cut_emoji), ("combining", combining)]:
        cell = cells[name]
        shown = cell.own_text()
        assert len(shown) <= TEXT_DISPLAY_CHARS and original.startswith(shown), name
        assert cell.find_all(cls="ellipsis")[0].text() == "…", name
        assert cell.find_all(cls="length")[0].text() == f"({len(original):,} chars)", name
        assert len(cell.attrs["title"]) <= 2001, name
        following = original[len(shown)]
        assert following not in "\u200d\u0301" and not shown.endswith("\u200d"), (
            f"{name}: cut inside a sequence"
        )
    assert long_text not in page
    assert cells["controls"].own_text() == "nul\ufffd bell\ufffd lone surrogate \ufffd end"
    assert cells["rtl"].own_text() == RTL and cells["rtl"].attrs["dir"] == "auto"
    assert cells["emoji-short"].own_text() == EMOJI


def test_empty_inputs_render():
    for report, groups in [({}, []), (None, None), ({"groups": 0, "group_size_histogram": {}}, [])]:
        page = render_report(report, groups)
        assert_self_contained(page)
        dom = parse(page)
        assert dom.by_id("stat-rows-in").find_all(cls="figure")[0].text() == "—"
        for chart in (
            "threshold-curve",
            "score-to-kept-histogram",
            "pair-score-histogram",
            "group-size-histogram",
        ):
            assert dom.by_id(chart).find_all("p", cls="empty"), chart
        for section in ("largest-groups", "random-groups"):
            assert "No groups in this sample." in dom.by_id(section).text()
        assert "No run details." in dom.text()


def test_wrong_types_and_odd_values_render():
    report = {
        "rows_in": "many",
        "rows_out": float("nan"),
        "removed": float("inf"),
        "groups": True,
        "threshold": [0.9],
        "similarity_fn_name": {"x": 1},
        "group_size_histogram": {"2": 0, "3": 0},  # no groups: zero bars, still an axis
        "score_to_kept_histogram": {"edges": [0.9, 1.0], "counts": [1, 2]},  # inconsistent
        "pair_score_histogram": {"edges": "0.9", "counts": None},
        "threshold_curve": [{"threshold": 0.9}, "x", {"threshold": 0.95, "rows_removed": 0, "groups": 0}],
        "target": "0.9",
        "collapsed": [],
        "timings": {"total_seconds": "slow"},
    }
    groups = [
        "not a group",
        {"group_id": None, "kind": "largest", "members": ["nope", {"kept": "yes"}, {"score": "0.5"}]},
        {"group_id": 3, "size": 5, "kind": "random", "members": []},
    ]
    page = render_report(report, groups)
    assert_self_contained(page)
    dom = parse(page)
    for stat in ("rows-in", "rows-out", "removed", "groups", "threshold", "similarity"):
        assert dom.by_id(f"stat-{stat}").find_all(cls="figure")[0].text() == "—", stat
    curve = dom.by_id("threshold-curve")
    assert len(curve.find_all("circle", cls="point")) == 1 and not curve.find_all("polyline")
    assert dom.by_id("score-to-kept-histogram").find_all("p", cls="empty")
    assert len(dom.by_id("group-size-histogram").find_all("rect", cls="bar")) == 2
    assert len(dom.find_all("article", cls="group")) == 2
    assert "… and 5 more rows not shown" in dom.by_id("random-groups").text()


def test_negative_scores_and_single_threshold():
    """Euclidean and manhattan scores are negative distances; a curve may hold one threshold."""
    report = sample_report(
        threshold=-5.0,
        similarity_fn_name="euclidean",
        pairs_floor=-6.5,
        threshold_curve=[{"threshold": -5.0, "rows_removed": 40, "groups": 12}],
        score_to_kept_histogram={"edges": [-5.0 + 0.5 * i for i in range(11)], "counts": [1] * 10},
        pair_score_histogram={"edges": [-0.5, 0.5], "counts": [7]},  # all scores equal (numpy pads the bin)
        removed=40,
    )
    dom = parse(render_report(report, []))
    assert dom.by_id("stat-threshold").find_all(cls="figure")[0].text() == "-5"
    curve = dom.by_id("threshold-curve")
    assert float(curve.find_all("g", cls="chosen")[0].attrs["data-threshold"]) == -5.0
    ticks = [t.text() for t in curve.find_all("text", cls="tick")]
    assert any(t.startswith("-5") for t in ticks), ticks
    for x in (float(c.attrs["cx"]) for c in curve.find_all("circle")):
        assert math.isfinite(x) and 0 < x < 960
    kept = dom.by_id("score-to-kept-histogram")
    labels = [t.text() for t in kept.find_all("text", cls="tick")]
    assert "-5.00" in labels and "0.00" in labels
    assert len(dom.by_id("pair-score-histogram").find_all("rect", cls="bar")) == 1


# ---------------------------------------------------------------- a real headless Chromium


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    def __init__(self, binary: str, home: Path):
        self.binary, self.home = binary, home
        self.version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()

    def run(self, url: str, *flags: str) -> subprocess.CompletedProcess:
        command = [
            self.binary,
            "--headless=new",
            "--no-sandbox",  # we run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={self.home / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            *flags,
            url,
        ]
        return subprocess.run(
            command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60
        )


def console_lines(stderr: str) -> list[str]:
    """The page's console messages (Chromium logs them as INFO:CONSOLE), and any uncaught error."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def chromium(tmp_path_factory) -> Chromium:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH (chromium / chromium-browser); apt-get install -y chromium")
    browser = Chromium(binary, tmp_path_factory.mktemp("chromium"))
    print(f"using {browser.version} at {binary}")
    return browser


@pytest.fixture(scope="module")
def page_file(chromium: Chromium, page: str) -> Path:
    path = chromium.home / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dumped(chromium: Chromium, page_file: Path) -> subprocess.CompletedProcess:
    done = chromium.run(page_file.as_uri(), "--dump-dom")
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_chromium_dom(dumped: subprocess.CompletedProcess):
    dom = parse(dumped.stdout)
    curve = dom.by_id("threshold-curve")
    assert curve.find_all("svg") and len(curve.find_all("circle", cls="point")) == len(CURVE)
    assert curve.find_all("polyline") and curve.find_all("g", cls="chosen")
    histograms = dom.find_all(cls="histogram")
    assert len(histograms) == 3
    for chart in histograms:
        assert chart.find_all("svg") and chart.find_all("rect", cls="bar"), chart.attrs["id"]
    groups = dom.find_all("article", cls="group")
    assert len(groups) == 2
    for group in groups:
        (kept,) = group.find_all("tr", cls="kept")
        assert kept.find_all(cls="badge-kept")[0].text() == "kept"
    # hostile texts stayed text in the browser too
    assert not dom.find_all("script") and not dom.find_all("img") and len(dom.find_all("h1")) == 1
    texts = [td.own_text() for td in dom.find_all("td", cls="text")]
    assert all(t in texts for t in HOSTILE)


def test_chromium_console_is_silent(dumped: subprocess.CompletedProcess):
    assert console_lines(dumped.stderr) == []


def test_chromium_sees_console_and_csp_blocks_scripts(chromium: Chromium, page: str):
    """Control for the test above: a script slipped into the page is refused by its policy, and
    Chromium's console output, which the test above reads, reports the refusal."""
    path = chromium.home / "injected.html"
    path.write_text(
        page.replace("</body>", "<script>console.log('injected-ran')</script></body>"), encoding="utf-8"
    )
    done = chromium.run(path.as_uri(), "--dump-dom")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = console_lines(done.stderr)
    assert any("Content Security Policy" in line for line in lines), done.stderr[-3000:]
    assert not any("injected-ran" in line for line in lines)


def decode_png(data: bytes) -> np.ndarray:
    """A non-interlaced 8-bit RGB / RGBA PNG as an (height, width, channels) uint8 array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, [], None
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    image = np.zeros((height, stride), np.uint8)
    previous = np.zeros(stride, np.uint8)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], np.frombuffer(raw, np.uint8, stride, start + 1).copy()
        if kind == 2:
            line += previous
        elif kind in (1, 3, 4):
            out, up = bytearray(line.tobytes()), previous.tobytes()
            for i in range(stride):
                a = out[i - bpp] if i >= bpp else 0
                if kind == 1:
                    out[i] = (out[i] + a) & 255
                elif kind == 3:
                    out[i] = (out[i] + ((a + up[i]) >> 1)) & 255
                else:
                    b = up[i]
                    c = up[i - bpp] if i >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    out[i] = (out[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            line = np.frombuffer(bytes(out), np.uint8)
        image[y] = previous = line
    return image.reshape(height, width, bpp)[:, :, :3]


def has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int, at_least: int) -> bool:
    close = np.all(np.abs(pixels.astype(np.int16) - np.array(rgb, np.int16)) <= tolerance, axis=-1)
    return int(close.sum()) >= at_least


def test_chromium_screenshot(chromium: Chromium, page_file: Path):
    shot = chromium.home / "report.png"
    done = chromium.run(page_file.as_uri(), f"--screenshot={shot}", "--window-size=1280,2400")
    assert done.returncode == 0 and shot.exists(), done.stderr[-3000:]
    assert console_lines(done.stderr) == []
    data = shot.read_bytes()
    assert len(data) > 50_000, f"a {len(data)}-byte screenshot is too plain"
    pixels = decode_png(data)
    assert pixels.shape == (2400, 1280, 3)
    packed = pixels.astype(np.uint32)
    colours = np.unique((packed[..., 0] << 16) | (packed[..., 1] << 8) | packed[..., 2])
    assert len(colours) > 200, f"{len(colours)} colours"
    background = np.all(pixels == np.array([248, 250, 252], np.uint8), axis=-1).mean()
    assert 0.05 < background < 0.9, f"{background:.0%} of the page is bare background"
    # what must be visible: the bars (accent at 85% over white), the chosen threshold (red dot), the kept
    # rows (their green background)
    assert has_colour(pixels, (70, 122, 238), 4, 5000), "no chart bars in the screenshot"
    assert has_colour(pixels, (220, 38, 38), 4, 40), "no chosen-threshold marker in the screenshot"
    assert has_colour(pixels, (236, 253, 245), 2, 5000), "no kept row in the screenshot"
