"""The observability files checked offline: the Grafana dashboard uses only the shared metric names
and every query parses with Prometheus' own parser (promtool); the Prometheus config passes
`promtool check config`; Grafana provisioning and the OpenTelemetry Collector pipeline are wired to
what docker-compose.yml runs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "kvmesh.json"
PROVISIONING = ROOT / "infra" / "grafana" / "provisioning"
PROMETHEUS = ROOT / "infra" / "prometheus" / "prometheus.yml"
COLLECTOR = ROOT / "infra" / "otel" / "collector.yaml"

# Grafana's variables, replaced by what Grafana would send so that Prometheus' parser sees PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$model_name": ".*"}
METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*")
HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expression) of every query on the dashboard, its variables' queries too."""
    out = [
        (panel["title"], target["expr"]) for panel in dash["panels"] for target in panel.get("targets", [])
    ]
    out += [(v["name"], v["definition"]) for v in dash["templating"]["list"] if v["type"] == "query"]
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (every contract name has a `vllm:`/`kvmesh:` prefix);
    histogram series map back to the histogram's name."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values may contain anything
    return {HISTOGRAM_SERIES.sub("", name) for name in METRIC_NAME.findall(expr)}


def promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return expr


def check_rules(promtool: str, exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Parse each expression with Prometheus' parser: as recording rules, through `promtool check rules`."""
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_dashboard_uses_only_the_shared_metric_names(contract_metrics):
    used = set()
    for title, expr in queries(dashboard()):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= contract_metrics, f"{title}: not contract names: {names - contract_metrics}"
        used |= names
    # ... and shows every one of them (TTFT, ITL/TPOT, e2e, queue depth, KV usage, prefix hits,
    # throughput, router decisions, achieved vs available hits, transfer, remote prefill, NATS).
    assert used == contract_metrics, f"not on the dashboard: {contract_metrics - used}"


def test_the_services_export_every_contract_name(contract_metrics):
    """The other side of the contract: kvmesh.libs.metrics registers every name the dashboard uses
    (counters appear with their _total suffix, as Prometheus stores them)."""
    pytest.importorskip("kvmesh.libs.metrics")
    pytest.importorskip("kvmesh.services.gateway.flow_metrics")  # registers flow control's collector
    from prometheus_client import REGISTRY, generate_latest

    exported = {
        line.split()[2]
        for line in generate_latest(REGISTRY).decode().splitlines()
        if line.startswith("# TYPE")
    }
    assert contract_metrics <= exported, f"not exported: {contract_metrics - exported}"


def test_latency_panels_are_percentiles_of_histogram_buckets():
    for title, expr in queries(dashboard()):
        for quantile_of in re.findall(r"histogram_quantile\(([^,]+),", expr):
            assert 0 < float(quantile_of) < 1, title
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \(le\b", expr), f"{title}: {expr}"
    titles = {panel["title"] for panel in dashboard()["panels"]}
    assert {"Time to first token", "Inter-token latency", "End-to-end request latency"} <= titles


def test_every_dashboard_query_parses_with_prometheus(promtool, tmp_path):
    exprs = [promql(expr) for title, expr in queries(dashboard()) if not expr.startswith("label_values(")]
    result = check_rules(promtool, exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_the_promql_check_can_fail(promtool, tmp_path):
    result = check_rules(promtool, ["sum(rate(vllm:prompt_tokens_total[1m])"], tmp_path)
    assert result.returncode != 0


def test_dashboard_layout_and_datasource():
    dash = dashboard()
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel.get("description"), f"{panel['title']}: say what it shows"
    cells = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        area = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    variable = next(v for v in dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == prometheus["uid"], "the dashboard opens on this datasource"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "kvmesh.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_config_passes_promtool(promtool):
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_collector_pipeline_receives_otlp_and_exports_to_jaeger():
    config = yaml.safe_load(COLLECTOR.read_text())
    (pipeline,) = config["service"]["pipelines"].values()
    for section in ("receivers", "processors", "exporters"):
        assert set(pipeline[section]) <= set(config[section]), f"{section}: undefined component"
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert pipeline["processors"][-1] == "batch", "batch last: spans leave in batches"


INFRA_YAML = sorted(
    p.relative_to(ROOT)
    for p in (ROOT / "infra").rglob("*.y*ml")
    if "templates" not in p.parts  # Helm: test_helm
)


@pytest.mark.parametrize("path", INFRA_YAML, ids=str)
def test_every_infra_yaml_file_parses(path):
    assert list(yaml.safe_load_all((ROOT / path).read_text()))
