"""deploy/grafana/pgwarden.json, parsed: every metric its queries use is one the gateway
exports (issue 13's contract), with labels that metric has, and every exported metric is
shown somewhere."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .contract import METRICS, SCRAPE_LABELS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pgwarden.json"
_METRIC = re.compile(r"\b(pgwarden_[a-z0-9_]+)(\{[^}]*\})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return value


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def _metric(series: str) -> str:
    """The exported metric a series belongs to (a histogram's _bucket/_sum/_count)."""
    for suffix in _HISTOGRAM_SERIES:
        base = series.removesuffix(suffix)
        if base != series and METRICS.get(base, ("",))[0] == "histogram":
            return base
    return series


def test_every_metric_is_in_the_contract_with_its_labels(dashboard: dict[str, Any]) -> None:
    queries = _queries(dashboard)
    assert queries
    for expr in queries:
        used = [(_metric(m.group(1)), m.group(2) or "") for m in _METRIC.finditer(expr)]
        assert used, f"a query on no pgwarden metric: {expr}"
        for metric, matchers in used:
            assert metric in METRICS, f"{metric} is not an exported metric: {expr}"
            labels = METRICS[metric][1] | SCRAPE_LABELS | {"le"}
            assert set(_MATCHER.findall(matchers)) <= labels, expr
            for by in _BY.findall(expr):
                grouped = {label.strip() for label in by.split(",") if label.strip()}
                assert grouped <= labels, f"{metric} has no label among {grouped}: {expr}"


def test_every_exported_metric_is_shown(dashboard: dict[str, Any]) -> None:
    shown = {_metric(m.group(1)) for q in _queries(dashboard) for m in _METRIC.finditer(q)}
    assert shown == set(METRICS), set(METRICS) - shown


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in _panels(dashboard["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                for variable in re.findall(r"\$(\w+)", target["expr"]):
                    assert variable in variables or variable.startswith("__"), variable
