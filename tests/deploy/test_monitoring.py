"""Monitoring: the Kustomize Component (ServiceMonitors, alert and recording
rules, the Grafana dashboard) and what it queries.

- The Component is optional: the base and an overlay without it render no
  Prometheus-operator kind, so they apply on a cluster without its CRDs.
- Every series an alert, a recording rule or a panel reads is one the services
  export (read from their modules) or one vLLM exports on the policy's metrics
  port (read from vLLM's source), and nothing else.
- The rules and every panel's query parse with Prometheus' own promtool, and
  the alerts fire, and stay quiet, on sample series (`promtool test rules`).
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from rendered import K8S, MAIN, REPO, command, kustomize, objects, one, pods, port_number, render, selected

COMPONENT = K8S / "components" / "monitoring"
MONITORING_GROUP = "monitoring.coreos.com"


# ---------------------------------------------------------------- the Component, in and out


def is_monitoring(doc: dict) -> bool:
    return doc["apiVersion"].startswith(MONITORING_GROUP + "/") or doc["metadata"]["name"] == "rlhf-grafana-dashboard"


def without_component(overlay: str, tmp_path: pathlib.Path) -> list[dict]:
    """The overlay as a user without the Prometheus operator makes it: the same
    folder with the monitoring line removed from `components:`."""
    src = K8S / overlay
    copy = tmp_path / overlay.replace("/", "-")
    shutil.copytree(src, copy)
    path = copy / "kustomization.yaml"
    k = yaml.safe_load(path.read_text())
    component = (src / "../../components/monitoring").resolve()
    assert any((src / c).resolve() == component for c in k["components"]), f"{overlay} does not include the Component"
    # Kustomize takes no absolute paths: point the copy's ../ entries at the same folders as before.
    moved = lambda entry: os.path.relpath(src / entry, copy) if entry.startswith("..") else entry  # noqa: E731
    k["components"] = [moved(c) for c in k["components"] if (src / c).resolve() != component]
    k["resources"] = [moved(r) for r in k["resources"]]
    path.write_text(yaml.safe_dump(k))
    return kustomize(copy)


def test_the_base_applies_without_the_prometheus_operator():
    docs = kustomize(K8S / "base")
    assert not [d for d in docs if is_monitoring(d)], "the base needs the Prometheus operator's CRDs"
    assert objects(docs, "Deployment") and objects(docs, "Job")


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_an_overlay_renders_with_and_without_the_component(overlay, tmp_path):
    with_it = render(overlay)
    kinds = {(d["apiVersion"], d["kind"]) for d in with_it if is_monitoring(d)}
    assert kinds == {(f"{MONITORING_GROUP}/v1", "ServiceMonitor"), (f"{MONITORING_GROUP}/v1", "PrometheusRule"),
                     ("v1", "ConfigMap")}, kinds
    without = without_component(overlay, tmp_path)
    assert not [d for d in without if d["apiVersion"].startswith(MONITORING_GROUP)], \
        f"{overlay} without the Component still renders {MONITORING_GROUP} kinds"
    # Everything else is exactly what the overlay renders with it.
    assert without == [d for d in with_it if not is_monitoring(d)]


def test_the_component_is_a_component():
    k = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert k["kind"] == "Component" and k["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert not any("monitoring" in r for r in base["resources"])


# ---------------------------------------------------------------- the operator's kinds


# The parts of the Prometheus Operator's CRDs these manifests use, with unknown
# fields rejected (monitoring.coreos.com/v1, as in the operator's CRD schemas).
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
METADATA = {"type": "object", "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                           "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
            "additionalProperties": False}
LABEL_SELECTOR = {"type": "object", "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array"}}, "additionalProperties": False}
SERVICE_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": LABEL_SELECTOR,
                     "namespaceSelector": {"type": "object"},
                     "jobLabel": {"type": "string"},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["port"], "additionalProperties": False,
                         "properties": {
                             "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                             "scheme": {"enum": ["http", "https"]},
                             "interval": {"type": "string", "pattern": DURATION},
                             "scrapeTimeout": {"type": "string", "pattern": DURATION},
                             "honorLabels": {"type": "boolean"},
                             "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}}}}}},
    },
}
PROMETHEUS_RULE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string", "pattern": DURATION},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                            # level:metric:operations, the recording-rule convention
                            "record": {"type": "string", "pattern": "^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$"},
                            "expr": {"type": "string", "minLength": 1},
                            "for": {"type": "string", "pattern": DURATION},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}}}},
    },
}


@pytest.mark.parametrize("stage", MAIN)
def test_operator_objects_have_the_operator_structure(stage):
    docs = render(stage)
    assert objects(docs, "ServiceMonitor") and objects(docs, "PrometheusRule")
    for d in objects(docs, "ServiceMonitor"):
        jsonschema.validate(d, SERVICE_MONITOR)
    for d in objects(docs, "PrometheusRule"):
        jsonschema.validate(d, PROMETHEUS_RULE)
        for group in d["spec"]["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
                    assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


@pytest.mark.parametrize("stage", MAIN)
def test_service_monitors_scrape_the_metrics_ports(stage):
    docs = render(stage)
    metrics_ports = {}
    for p in pods(docs):
        cmd = command(p.main, p)
        if cmd.rlhf is not None and hasattr(cmd.rlhf, "metrics_port") and p.role in ("", "Master"):
            metrics_ports[p.name] = cmd.rlhf.metrics_port
    scraped = set()
    for sm in objects(docs, "ServiceMonitor"):
        services = [s for s in objects(docs, "Service")
                    if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        # One Service per monitor: the headless twin would scrape every pod twice.
        assert len(services) == 1, f"ServiceMonitor {sm['metadata']['name']} selects {len(services)} Services"
        svc = services[0]
        for ep in sm["spec"]["endpoints"]:
            port = next(p for p in svc["spec"]["ports"] if p["name"] == ep["port"])
            for p in selected(svc["spec"]["selector"], docs):
                assert port_number(p.main, port["targetPort"]) == metrics_ports.get(p.name), \
                    f"{stage}: {sm['metadata']['name']} scrapes {p.name} on a port that is not its --metrics-port"
                scraped.add(p.name)
    assert scraped == set(metrics_ports), f"{stage}: scraped {scraped}, metrics served by {set(metrics_ports)}"


# ---------------------------------------------------------------- the series queried


SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}


@functools.cache
def our_series() -> frozenset[str]:
    """The series the services export: the metric objects of every module under
    services/ that uses prometheus_client, imported and read from the registry,
    with the suffixes Prometheus sees (_total; _bucket/_sum/_count)."""
    import prometheus_client

    for path in sorted((REPO / "services").rglob("*.py")):
        if "prometheus_client" in path.read_text():
            importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
    names = set()
    for metric in prometheus_client.REGISTRY.collect():
        if metric.name.startswith(("rlhf_", "grpc_server_")):
            names |= {metric.name + s for s in SUFFIXES.get(metric.type, [""])}
    return frozenset(names)


@functools.cache
def vllm_series() -> frozenset[str]:
    """The series vLLM's Prometheus logger defines (vllm/v1/metrics/loggers.py of
    the installed vLLM, read as source, not imported), with their suffixes."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("vLLM is not installed: the dashboard's vllm:* panels are checked against its source")
    source = pathlib.Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py"
    kinds = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in kinds:
            for kw in node.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant) and kw.value.value.startswith("vllm:"):
                    names |= {kw.value.value + s for s in SUFFIXES[kinds[node.func.attr]]}
    return frozenset(names)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions,
    keywords, label names in {...}, by/on/... lists, or template variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # string literals
    expr = re.sub(r"\{[^{}]*\}", "{}", expr)                    # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)                      # range selectors
    expr = re.sub(r"\$\w+", "", expr)                           # $__rate_interval and the like
    words = set(re.findall(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()", expr))
    return words - {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                    "bool", "offset", "inf", "nan", "le"}


def test_metric_name_extraction():
    assert metric_names('sum by (le, pod) (rate(a_b_bucket{namespace="$namespace", x!="y"}[$__rate_interval]))') \
        == {"a_b_bucket"}
    assert metric_names("max by (namespace) (x) - on (namespace) group_right y > 0") == {"x", "y"}
    assert metric_names('60 * sum(rate(vllm:num_preemptions_total{a="b"}[5m]))') == {"vllm:num_preemptions_total"}


def rule_groups() -> list[dict]:
    return yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())["spec"]["groups"]


def rules() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"]]


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboard() -> dict:
    return json.loads((COMPONENT / "rlhf-dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def unknown_series(names: set[str]) -> set[str]:
    """Names that neither the services, vLLM, the recording rules nor Prometheus itself (`up`) produce.
    vllm:* names are looked up in vLLM's list only, the others in ours only."""
    ours = our_series() | recorded() | {"up"}
    return {n for n in names if n not in (vllm_series() if n.startswith("vllm:") else ours)}


def test_the_series_lists_are_read_not_empty():
    # The control for the tests below: both lists hold what they must.
    assert {"rlhf_policy_weight_version", "rlhf_trainer_weight_version", "grpc_server_handled_total",
            "grpc_server_started_total", "grpc_server_handling_seconds_bucket"} <= our_series()
    assert {"vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds_bucket"} <= vllm_series()
    assert not any(n.startswith("vllm:") for n in our_series())
    assert unknown_series({"rlhf_trainer_tokens_per_second_typo", "vllm:rlhf_policy_weight_version"}) == \
        {"rlhf_trainer_tokens_per_second_typo", "vllm:rlhf_policy_weight_version"}


def test_rules_query_only_exported_series():
    for r in rules():
        unknown = unknown_series(metric_names(r["expr"]))
        assert not unknown, f"{r.get('alert') or r['record']} queries series nothing exports: {unknown}"
    # Recording rules are there to be used.
    used = set().union(*(metric_names(e) for e in [r["expr"] for r in rules()] + dashboard_exprs()))
    assert recorded() and recorded() <= used, recorded() - used


def test_alerts_watch_what_the_issues_ask():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert {"RLHFPolicyReplicaBehind", "RLHFRewardErrorRate", "RLHFRewardHTTPErrorRate", "RLHFTrainerStalled",
            "RLHFWeightPushFailing", "RLHFPolicyPreempting", "RLHFVersionSkew", "RLHFTargetDown",
            "RLHFRewardModelDisagreesWithPeople"} <= alerts.keys()
    # The reward-hacking alarm (issue 25): the feedback service's agreement, and only with enough judgments.
    assert metric_names(alerts["RLHFRewardModelDisagreesWithPeople"]["expr"]) == {
        "rlhf_feedback_rm_agreement_ratio", "rlhf_feedback_rm_agreement_judgments"}
    assert {"rlhf_policy_weight_version", "rlhf_trainer_weight_version"} <= metric_names(alerts["RLHFPolicyReplicaBehind"]["expr"])
    assert 'grpc_service="rlhf.v1.RewardService"' in alerts["RLHFRewardErrorRate"]["expr"]
    # Rates come from counters: no gauge computed in the process.
    assert metric_names(alerts["RLHFTrainerStalled"]["expr"]) == {"rlhf_trainer_steps_total"}
    assert metric_names(alerts["RLHFWeightPushFailing"]["expr"]) == {"rlhf_trainer_weight_pushes_total"}


def test_dashboard_is_shipped_and_queries_exported_series():
    cm = one(render("overlays/gpu"), "ConfigMap", "rlhf-grafana-dashboard")
    assert cm["metadata"]["labels"].get("grafana_dashboard") == "1"  # the Grafana sidecar's label
    assert json.loads(cm["data"]["rlhf.json"]) == dashboard()
    d = dashboard()
    assert d["uid"] and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, expr
        assert not unknown_series(names), f"the dashboard queries series nothing exports: {unknown_series(names)}"
        used |= names
    # The main series of each service have a panel, the renamed ones under their new names.
    for must in ("rlhf_trainer_reward_mean", "rlhf_trainer_kl", "rlhf_trainer_weight_version",
                 "rlhf_trainer_generated_tokens_total", "rlhf_trainer_steps_total", "rlhf_trainer_weight_pushes_total",
                 "rlhf_policy_weight_version", "rlhf_policy_generated_tokens_total", "rlhf_reward_samples_total",
                 "rlhf_reward_http_requests_total", "rlhf_reward_http_request_seconds_bucket",
                 "rlhf_reward_component_value_sum", "rlhf_build_info", "grpc_server_started_total",
                 "grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:num_preemptions_total", "rlhf_feedback_rm_agreement_ratio",
                 "rlhf_feedback_labeller_agreement_ratio", "rlhf_feedback_judgments_total",
                 "rlhf_trainer_push_wire_bytes_total", "rlhf_trainer_push_changed_share",
                 "rlhf_trainer_push_phase_seconds_sum", "rlhf_trainer_canary_verdicts_total"):
        assert must in used, must
    for gone in ("rlhf_trainer_tokens_per_second", "rlhf_policy_requests_total", "rlhf_reward_requests_total"):
        assert gone not in used | set().union(*(metric_names(r["expr"]) for r in rules())), gone


# ---------------------------------------------------------------- promtool


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: install Debian's `prometheus` package (it ships promtool)")
    return path


def test_rules_and_panels_pass_promtool_check(tmp_path):
    """Every rule and every dashboard query is valid PromQL, checked by Prometheus'
    own promtool (Debian package `prometheus`)."""
    records = [{"record": f"dashboard:query_{i}:check",
                "expr": e.replace("$__rate_interval", "1m").replace("$namespace", "rlhf")}
               for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups() + [{"name": "dashboard", "rules": records}]}))
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules()) + len(records)} rules found" in out.stdout


def series(name: str, values: str, **labels) -> dict:
    labels = {"namespace": "rlhf"} | labels
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def fires(alert: str, at: str, *label_sets: dict) -> dict:
    """A promtool alert check: at `at`, `alert` fires once per label set (none: it is quiet).
    The alert's own labels (severity) are added when the test runs."""
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels} for labels in label_sets]}


# Each case: sample series (one a minute), then when each alert fires or stays quiet.
ALERT_CASES = {
    "a stuck trainer": (
        [series("rlhf_trainer_steps_total", "0+1x10 10+0x40", pod="trainer-0")],
        [fires("RLHFTrainerStalled", "20m"),                     # flat for 10 min: not yet
         fires("RLHFTrainerStalled", "35m", {"namespace": "rlhf", "pod": "trainer-0"})]),
    "a trainer making steps": (
        [series("rlhf_trainer_steps_total", "0+1x60", pod="trainer-0")],
        [fires("RLHFTrainerStalled", "50m")]),
    "a replica behind the trainer": (
        [series("rlhf_trainer_weight_version", "7x20", pod="trainer-0"),
         series("rlhf_policy_weight_version", "7x20", pod="policy-a"),
         series("rlhf_policy_weight_version", "6x20", pod="policy-b")],
        [fires("RLHFPolicyReplicaBehind", "3m"),
         fires("RLHFPolicyReplicaBehind", "10m", {"namespace": "rlhf", "pod": "policy-b"})]),
    "reward errors, 10% then 1%": (
        [series("grpc_server_handled_total", "0+90x30 2700+99x30", grpc_service="rlhf.v1.RewardService",
                grpc_method="Score", grpc_code="OK", pod="reward-a"),
         series("grpc_server_handled_total", "0+10x30 300+1x30", grpc_service="rlhf.v1.RewardService",
                grpc_method="Score", grpc_code="UNAVAILABLE", pod="reward-a")],
        [fires("RLHFRewardErrorRate", "20m", {"namespace": "rlhf", "grpc_service": "rlhf.v1.RewardService"}),
         fires("RLHFRewardErrorRate", "55m")]),
    "HTTP 5xx": (
        [series("rlhf_reward_http_requests_total", "0+90x30", path="/get_reward", code="200", pod="reward-a"),
         series("rlhf_reward_http_requests_total", "0+10x30", path="/get_reward", code="503", pod="reward-a"),
         series("rlhf_reward_http_requests_total", "0+50x30", path="/get_reward", code="400", pod="reward-a")],
        [fires("RLHFRewardHTTPErrorRate", "20m", {"namespace": "rlhf"})]),
    "pushes failing, then recovered": (
        [series("rlhf_trainer_weight_pushes_total", "0+1x60", result="ok", pod="trainer-0"),
         series("rlhf_trainer_weight_pushes_total", "0+1x30 30+0x30", result="unavailable", pod="trainer-0")],
        [fires("RLHFWeightPushFailing", "25m", {"namespace": "rlhf"}),
         fires("RLHFWeightPushFailing", "55m")]),
    "vLLM preempting": (
        [series("vllm:num_preemptions_total", "0+3x30", pod="policy-a", model_name="rlhf-policy", engine="0"),
         series("vllm:num_preemptions_total", "0+0x30", pod="policy-b", model_name="rlhf-policy", engine="0")],
        [fires("RLHFPolicyPreempting", "25m", {"namespace": "rlhf", "pod": "policy-a"})]),
    "a rollout stuck half way": (
        [series("rlhf_build_info", "1x60", service="rlhf-policy", exported_service="policy", version="0.1.0", pod="policy-a"),
         series("rlhf_build_info", "1x60", service="rlhf-policy", exported_service="policy", version="0.2.0", pod="policy-b"),
         series("rlhf_build_info", "1x60", service="rlhf-reward", exported_service="reward", version="0.2.0", pod="reward-a")],
        [fires("RLHFVersionSkew", "20m"),
         fires("RLHFVersionSkew", "40m", {"namespace": "rlhf", "service": "rlhf-policy"})]),
    # The reward model falls behind people: 0.8 agreement for 20 min, then 0.5. Fires 30 min after the
    # drop; with only 30 judgments behind the ratio (too few to trust) it stays quiet.
    "the reward model disagrees with people": (
        [series("rlhf_feedback_rm_agreement_ratio", "0.8x20 0.5x60", pod="feedback-a"),
         series("rlhf_feedback_rm_agreement_judgments", "200x80", pod="feedback-a"),
         series("rlhf_feedback_rm_agreement_ratio", "0.4x80", namespace="lab", pod="feedback-b"),
         series("rlhf_feedback_rm_agreement_judgments", "30x80", namespace="lab", pod="feedback-b")],
        [fires("RLHFRewardModelDisagreesWithPeople", "40m"),
         fires("RLHFRewardModelDisagreesWithPeople", "55m", {"namespace": "rlhf"})]),
    "a target down": (
        [series("up", "1x10 0x20", service="rlhf-reward", pod="reward-a", job="rlhf-reward")],
        [fires("RLHFTargetDown", "20m", {"namespace": "rlhf", "service": "rlhf-reward", "pod": "reward-a",
                                         "job": "rlhf-reward"})]),
}


def test_alerts_fire_on_sample_series_and_stay_quiet_otherwise(tmp_path):
    """`promtool test rules`: each alert on series where it must fire (with the
    labels it must carry) and where it must not. Annotations are left out here
    (they are templates; test_operator_objects_have_the_operator_structure
    checks they are there)."""
    groups = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
              for g in rule_groups()]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    labels = {r["alert"]: r["labels"] for r in rules() if "alert" in r}
    checks = lambda cases: [{**c, "exp_alerts": [{"exp_labels": labels[c["alertname"]] | e["exp_labels"]}  # noqa: E731
                                                 for e in c["exp_alerts"]]} for c in cases]
    tests = [{"name": name, "interval": "1m", "input_series": inputs, "alert_rule_test": checks(cases)}
             for name, (inputs, cases) in ALERT_CASES.items()]
    # The recording rule the error alert reads, checked on its own.
    tests.append({"name": "error ratio", "interval": "1m",
                  "input_series": ALERT_CASES["reward errors, 10% then 1%"][0],
                  "promql_expr_test": [{"expr": "namespace_grpc_service:grpc_server_handled:error_ratio_rate5m",
                                        "eval_time": "15m",
                                        "exp_samples": [{"labels": 'namespace_grpc_service:grpc_server_handled:error_ratio_rate5m'
                                                                   '{grpc_service="rlhf.v1.RewardService", namespace="rlhf"}',
                                                         "value": 0.1}]}]})
    assert labels.keys() <= {c["alertname"] for _, cases in ALERT_CASES.values() for c in cases}, "an alert without a case"
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                        "tests": tests}))
    out = subprocess.run([promtool(), "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_catches_an_alert_that_does_not_fire(tmp_path):
    # The control for the test above: a wrong expectation must fail promtool.
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [
        {"name": "g", "rules": [{"alert": "A", "expr": "x > 1", "labels": {"severity": "warning"}}]}]}))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [
        {"interval": "1m", "input_series": [{"series": "x", "values": "0x5"}],
         "alert_rule_test": [{"eval_time": "3m", "alertname": "A", "exp_alerts": [{"exp_labels": {"severity": "warning"}}]}]}]}))
    out = subprocess.run([promtool(), "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
