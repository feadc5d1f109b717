"""docs/grafana/gpuq.json, the Grafana dashboard shipped for the manager's and the workers' Prometheus
metrics, queries exactly the names the code exports: a renamed metric breaks this test, not the panels."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from manager.metrics import Metrics
from worker.metrics import WorkerMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "gpuq.json"
# The sample names each kind of metric family is exposed under (prometheus_client's text format).
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Family name -> the sample names /metrics shows for it."""
    return {f.name: {f.name + s for s in SUFFIXES[f.type]} for f in registry.collect()}


def queried() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    return {name for e in exprs for name in re.findall(r"\bgpuq_[a-z0-9_]+\b", e)}


def test_every_metric_the_dashboard_queries_is_one_the_code_exports() -> None:
    families = {**exported(Metrics().registry), **exported(WorkerMetrics().registry)}
    samples = set().union(*families.values())
    assert queried() - samples == set()


def test_every_metric_the_code_exports_has_a_panel() -> None:
    names = queried()
    for registry in (Metrics().registry, WorkerMetrics().registry):
        for family, samples in exported(registry).items():
            assert samples & names, f"{family} is on no panel"


def test_the_dashboard_is_well_formed_for_import() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert all(t["refId"] and t["expr"] for t in panel["targets"])
