"""The Grafana dashboard deploy/grafana/unclip.json, checked against the metrics unclip defines.

Every PromQL expression is tokenized and each metric it selects, each label it matches or groups
by, and each label its legend names must exist in unclip/metrics.py (a counter as <name>_total, a
histogram as <name>_bucket/_sum/_count, `le` on buckets), so renaming a metric or a label breaks
this test until the dashboard follows. Each selector must also match both namings: <name> (local
mode's /metrics) and ray_<name> (Ray's metrics endpoint under Ray Serve).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram

from unclip import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "unclip.json"
RAY_PREFIX = "ray_"

# What the dashboard's expressions may call; anything else fails until added here on purpose.
FUNCTIONS = {"rate", "irate", "increase", "histogram_quantile", "clamp_min", "clamp_max", "abs", "vector", "scalar"}
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "topk", "bottomk", "quantile", "stddev", "stdvar"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset"}

TOKEN = re.compile(
    r"""\s+
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<range>\[[^\]]*\])
    |(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)
    |(?P<variable>\$\{?\w+\}?)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){},])""",
    re.X,
)


@cache
def series() -> dict[str, set[str]]:
    """Every series name unclip's metrics export in local mode, with its label names."""
    found: dict[str, set[str]] = {}
    for definition in metrics.DEFINITIONS.values():
        labels = set(definition.labels)
        if definition.kind is Counter:
            found[f"{definition.name}_total"] = labels
        elif definition.kind is Gauge:
            found[definition.name] = labels
        elif definition.kind is Histogram:
            found[f"{definition.name}_bucket"] = labels | {"le"}
            found[f"{definition.name}_sum"] = labels
            found[f"{definition.name}_count"] = labels
        else:
            raise AssertionError(f"{definition.name}: teach this test the series of a {definition.kind.__name__}")
    return found


def base_name(name: str) -> str:
    """The metric a series belongs to, as unclip/metrics.py names it."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] + "_bucket" in series():
            return name[: -len(suffix)]
    return name.removesuffix("_total") if name.endswith("_total") and name in series() else name


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        if not match:
            raise ValueError(f"cannot tokenize at {expr[pos : pos + 20]!r}")
        pos = match.end()
        if match.lastgroup:
            out.append((match.lastgroup, match.group()))
    return out


@dataclass
class Report:
    series: set[str] = field(default_factory=set)  # unclip series names selected (local-mode naming)
    labels: set[str] = field(default_factory=set)  # label names the selected series have
    errors: list[str] = field(default_factory=list)


def check_selector(name_op: str | None, name: str | None, matchers: list[tuple[str, str]], report: Report) -> None:
    known = series()
    if name_op is None:
        report.errors.append("a selector without a metric name")
        return
    if name_op == "=~":
        pattern = re.compile(name)
        selected = {s for s in known if pattern.fullmatch(s)}
        ray_selected = {s for s in known if pattern.fullmatch(RAY_PREFIX + s)}
    elif name_op == "=":
        selected = {name} & set(known)
        ray_selected = {name.removeprefix(RAY_PREFIX)} & set(known) if name.startswith(RAY_PREFIX) else set()
    else:
        report.errors.append(f"__name__{name_op}{name!r}: select a metric with = or =~")
        return
    if not selected and not ray_selected:
        report.errors.append(f"{name!r} selects no metric unclip/metrics.py defines")
        return
    if selected != ray_selected:
        report.errors.append(f"{name!r} must select the same metric as <name> and as ray_<name> (local and Ray names)")
    for chosen in selected | ray_selected:
        report.series.add(chosen)
        report.labels |= known[chosen]
        for label, _ in matchers:
            if label not in known[chosen]:
                report.errors.append(f"{chosen} has no label {label!r}")


def check_expression(expr: str) -> Report:
    """Metric names and label names of one PromQL expression, checked against unclip's metrics."""
    report = Report()
    try:
        toks = tokens(expr)
    except ValueError as error:
        report.errors.append(str(error))
        return report
    grouped: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "ident" and text in GROUPING and following == "(":
            i += 2
            while toks[i][1] != ")":
                if toks[i][0] == "ident":
                    grouped.add(toks[i][1])
                i += 1
        elif kind == "ident" and following == "(" and text not in AGGREGATIONS | KEYWORDS:
            if text not in FUNCTIONS:
                report.errors.append(f"unknown function {text}()")
        elif kind == "ident" and text not in AGGREGATIONS | KEYWORDS | GROUPING:
            # A bare metric name matches only one of the two namings.
            check_selector("=", text, [], report)
            if following == "{":
                report.errors.append(f"{text}{{...}}: write the name as a __name__ matcher")
        elif text == "{":
            name_op = name = None
            matchers = []
            i += 1
            while toks[i][1] != "}":
                if toks[i][1] == ",":
                    i += 1
                    continue
                (_, label), (_, op), (value_kind, value) = toks[i : i + 3]
                assert value_kind == "string", f"matcher {label}{op}{value}"
                if label == "__name__":
                    name_op, name = op, json.loads(value) if value.startswith('"') else value[1:-1]
                else:
                    matchers.append((label, op))
                i += 3
            check_selector(name_op, name, matchers, report)
        i += 1
    for label in sorted(grouped - report.labels):
        report.errors.append(f"groups by {label!r}, which none of its metrics has")
    return report


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return found


def targets() -> list[tuple[str, dict]]:
    return [(panel["title"], target) for panel in panels() for target in panel.get("targets", [])]


def test_dashboard_model():
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells = set()
    for panel in panels():
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    for title, target in targets():
        assert target["datasource"]["uid"] == "${datasource}", title


def test_queries_use_only_metrics_and_labels_unclip_defines():
    used = set()
    for title, target in targets():
        report = check_expression(target["expr"])
        assert not report.errors, f"{title}: {target['expr']}\n" + "\n".join(report.errors)
        assert report.series, f"{title}: selects no metric"
        used |= {base_name(s) for s in report.series}
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
            assert label in report.labels - {"le"}, f"{title}: legend names {label!r}, which the series have not"
    defined = {base_name(s) for s in series()}
    assert defined - used == set(), "metrics of unclip/metrics.py the dashboard does not show"


def test_histograms_are_read_through_their_buckets():
    """Latency panels: histogram_quantile over _bucket series, grouped by le."""
    quantiles = [t["expr"] for _, t in targets() if "histogram_quantile" in t["expr"]]
    assert quantiles
    for expr in quantiles:
        assert re.search(r"_bucket\"", expr) and re.search(r"by \(le\b", expr), expr
    latency = {base_name(s) for expr in quantiles for s in check_expression(expr).series}
    assert {"unclip_request_duration_seconds", "unclip_stage_duration_seconds"} <= latency


@pytest.mark.parametrize(
    "expr, error",
    [
        ('rate({__name__=~"(ray_)?unclip_request_total"}[5m])', "selects no metric"),  # a renamed metric
        ('sum by (stage) (rate({__name__=~"(ray_)?unclip_requests_total"}[5m]))', "groups by 'stage'"),
        ('{__name__=~"(ray_)?unclip_requests_total", route="x"}', "has no label 'route'"),
        ('{__name__=~"(ray_)?unclip_request_duration_seconds", le="1"}', "selects no metric"),  # no _bucket
        ("rate(unclip_requests_total[5m])", "same metric as <name> and as ray_<name>"),
        ('{__name__="ray_unclip_build_info"}', "same metric as <name> and as ray_<name>"),
        ('rate({__name__=~"(ray_)?unclip_requests_total"}[5m]) @ 1', "cannot tokenize"),
        ('predict_linear({__name__=~"(ray_)?unclip_stage_queue_depth"}[5m], 60)', "unknown function"),
    ],
)
def test_checker_catches_mistakes(expr, error):
    report = check_expression(expr)
    assert any(error in message for message in report.errors), report.errors


def test_checker_accepts_both_namings():
    report = check_expression('sum by (le, method) (rate({__name__=~"(ray_)?unclip_request_duration_seconds_bucket"}[1m]))')
    assert report.errors == [] and report.series == {"unclip_request_duration_seconds_bucket"}
