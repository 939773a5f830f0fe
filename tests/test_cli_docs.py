"""The operations docs cannot drift from the code they describe."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from choreo.demo import build_order_apps
from choreo.graph import EventGraph, to_mermaid
from choreo.metrics import Metrics
from choreo.saga.metrics import SagaMetrics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_cli_reference_is_generated_from_the_typer_app() -> None:
    result = subprocess.run([sys.executable, "scripts/generate_cli_docs.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr


def test_cli_reference_covers_every_command_of_the_design() -> None:
    text = (DOCS / "cli.md").read_text()
    for command in ("worker", "publish", "routes", "graph", "check", "trace", "demo", "dlq list", "dlq show",
                    "dlq replay", "dlq purge", "saga list", "saga status", "saga resume", "dashboard"):
        assert f"## `choreo {command}`" in text
    for option in ("--workers", "--metrics-port", "--metrics-host", "--log-level", "--log-format", "--concurrency"):
        assert f"`{option}`" in text


def all_metrics() -> Metrics:
    """The core metrics with the saga package's registered in the same registry."""
    metrics = Metrics()
    SagaMetrics(metrics)
    return metrics


def test_metrics_reference_names_every_metric_registered() -> None:
    text = (DOCS / "metrics.md").read_text()
    names = {metric.name for metric in all_metrics().registry.collect()}
    for name in names:
        shown = name + "_total" if f"`{name}_total`" in text else name
        assert f"`{shown}`" in text, name


def test_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    known = {metric.name for metric in all_metrics().registry.collect()}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"choreo_[a-z_]+", target["expr"]))
    stripped = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    assert stripped <= known, stripped - known
    assert {"choreo_events_handled", "choreo_stream_pending", "choreo_saga_failed"} <= stripped


def test_the_rendered_example_diagram_is_what_graph_draws_for_the_demo() -> None:
    text = (DOCS / "graph-and-trace.md").read_text()
    block = text.split("```mermaid\n")[1].split("```")[0]
    assert block == to_mermaid(EventGraph.from_apps(build_order_apps()))
