"""The Kubernetes manifests, as rendered: what a cluster would get from
`kubectl apply -k deploy/k8s/overlays/<overlay>`.

Each overlay is rendered once with the real `kubectl kustomize` and checked
against the things that would break a deployment without any error at apply
time: a flag the CLI does not have, a probe on the wrong port or health name, a
ServiceMonitor scraping a port that serves nothing, a drain cut short by the
kubelet, a GPU requested where there is none. Built-in kinds are validated
strictly against Kubernetes' own schemas; the Prometheus Operator's CRDs
(ServiceMonitor, PrometheusRule) are not in those schemas, so their structure
is checked here. No cluster and no network are needed.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import pathlib
import re
import shlex
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from rlhf.v1 import policy_pb2, reward_pb2, trainer_pb2
from services.cli import build_parser

REPO = pathlib.Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["gpu", "cpu"]

# The oldest Kubernetes the manifests support (native gRPC probes, the preStop
# sleep action and Job.podReplacementPolicy are all on by default from 1.30;
# kubectl here is 1.32) and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.32.0", kubernetes_validate.utils.latest_version()]

# The health names the servers register: the full names of the gRPC services.
HEALTH_NAME = {
    "services.policy.main:main": policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
    "services.reward.main:main": reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name,
    "services.trainer.loop:main": trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
}



@functools.cache
def known_series() -> frozenset[str]:
    """The series names the services really export: their metric objects, read
    from the modules that define them (no torch or vLLM is imported), with the
    suffixes Prometheus sees (_total; _bucket/_sum/_count for histograms).
    Alerts and dashboard panels may only query these and Prometheus' `up`."""
    import prometheus_client

    import services.common.interceptor  # noqa: F401  grpc_server_*
    import services.policy.engine  # noqa: F401  rlhf_policy_*
    import services.reward.server  # noqa: F401  rlhf_reward_*
    import services.trainer.metrics  # noqa: F401  rlhf_trainer_*

    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    names = {"up"}
    for metric in prometheus_client.REGISTRY.collect():
        if metric.name.startswith(("rlhf_", "grpc_server_")):
            names |= {metric.name + s for s in suffixes.get(metric.type, [""])}
    return frozenset(names)


# ---------------------------------------------------------------- rendering


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request, kustomize) -> tuple[str, list[dict]]:
    return request.param, kustomize(request.param)


@pytest.fixture(scope="module")
def rendered(kustomize) -> dict[str, list[dict]]:
    return {name: kustomize(name) for name in OVERLAYS}


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def strict_parser() -> argparse.ArgumentParser:
    """services.cli's parser with abbreviations off: a manifest must spell each
    flag in full (argparse would take `--resum` for `--resume`, and a later flag
    starting the same way would make it ambiguous)."""
    def walk(p: argparse.ArgumentParser) -> None:
        p.allow_abbrev = False
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
    parser = build_parser()
    walk(parser)
    return parser


def parse_cli(container: dict):
    """The container's command line, parsed by the real `rlhf` parser."""
    assert container.get("command") == ["rlhf"], f"{container['name']}: command must be the rlhf entrypoint"
    argv = [str(a) for a in container.get("args", [])]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return strict_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{container['name']}: `rlhf {shlex.join(argv)}` is rejected by services.cli:\n{err.getvalue()}")


def server_containers(docs: list[dict]):
    """(workload, container, parsed args, health name) of every gRPC server."""
    for w in workloads(docs):
        for c in containers(w):
            args = parse_cli(c)
            if args.target in HEALTH_NAME:
                yield w, c, args, HEALTH_NAME[args.target]


def port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"{container['name']}: no container port named {port!r}"
    return named[port]


def selected_by(selector: dict, docs: list[dict]) -> list[dict]:
    return [w for w in workloads(docs) if selector.items() <= pod_labels(w).items()]


# ---------------------------------------------------------------- rendering and schemas


def test_overlay_renders_every_part(overlay):
    name, docs = overlay
    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    want = {
        ("Namespace", "rlhf"), ("ServiceAccount", "rlhf"),
        ("Deployment", "rlhf-policy"), ("Service", "rlhf-policy"), ("Service", "rlhf-policy-headless"),
        ("PodDisruptionBudget", "rlhf-policy"), ("NetworkPolicy", "rlhf-policy"), ("ServiceMonitor", "rlhf-policy"),
        ("Deployment", "rlhf-reward"), ("Service", "rlhf-reward"), ("Service", "rlhf-reward-headless"),
        ("PodDisruptionBudget", "rlhf-reward"), ("NetworkPolicy", "rlhf-reward"), ("ServiceMonitor", "rlhf-reward"),
        ("Job", "rlhf-trainer"), ("Service", "rlhf-trainer"), ("NetworkPolicy", "rlhf-trainer"),
        ("ServiceMonitor", "rlhf-trainer"), ("PersistentVolumeClaim", "rlhf-checkpoints"),
        ("PersistentVolumeClaim", "rlhf-models"), ("PrometheusRule", "rlhf"),
        ("ConfigMap", "rlhf-grafana-dashboard"),
    }
    assert want <= have, f"overlays/{name} lacks {sorted(want - have)}"
    assert any(k == "ConfigMap" and n.startswith("rlhf-trainer-config") for k, n in have)
    # Everything but the Namespace itself lands in it.
    assert all(d["metadata"].get("namespace") == "rlhf" for d in docs if d["kind"] != "Namespace")


CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_pass_strict_schema_validation(overlay, version):
    name, docs = overlay
    checked = 0
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            continue  # not in Kubernetes' schemas: test_crd_objects_have_the_operator_structure
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"overlays/{name}: {d['apiVersion']} {d['kind']} is not a Kubernetes {version} kind")
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"overlays/{name}: {d['kind']} {d['metadata']['name']} is invalid for {version}: {e.message}"
                        f" at {'/'.join(map(str, e.path))}")
        checked += 1
    assert checked >= 15


def test_strict_validation_rejects_an_unknown_field(rendered):
    # The control for the test above: strict mode must catch a misspelt field.
    policy = json.loads(json.dumps(one(rendered["gpu"], "Deployment", "rlhf-policy")))
    pod_spec(policy)["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, KUBERNETES_VERSIONS[-1], strict=True)


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
                            "record": {"type": "string"},
                            "expr": {"type": "string", "minLength": 1},
                            "for": {"type": "string", "pattern": DURATION},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}}}},
    },
}


def test_crd_objects_have_the_operator_structure(overlay):
    _, docs = overlay
    for d in objects(docs, "ServiceMonitor"):
        jsonschema.validate(d, SERVICE_MONITOR)
    for d in objects(docs, "PrometheusRule"):
        jsonschema.validate(d, PROMETHEUS_RULE)
        for group in d["spec"]["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
                    assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


# ---------------------------------------------------------------- containers


def test_every_container_has_requests_and_limits(overlay):
    name, docs = overlay
    for w in workloads(docs):
        for c in containers(w):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= res.get(part, {}).keys(), \
                    f"overlays/{name}: {w['metadata']['name']}/{c['name']} lacks {part} for cpu and memory"


def test_gpu_overlay_puts_policy_reward_and_trainer_on_gpus(rendered):
    docs = rendered["gpu"]
    for kind, name in [("Deployment", "rlhf-policy"), ("Deployment", "rlhf-reward"), ("Job", "rlhf-trainer")]:
        w = one(docs, kind, name)
        spec = pod_spec(w)
        res = spec["containers"][0]["resources"]
        # Extended resources are requested in limits (requests, if given, must equal them).
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1, name
        assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]
        assert spec["nodeSelector"].get("nvidia.com/gpu.present") == "true", name
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                   and t.get("operator") in ("Exists", "Equal") for t in spec["tolerations"]), name


def test_cpu_overlay_asks_for_no_gpu(rendered):
    docs = rendered["cpu"]
    assert "nvidia.com" not in yaml.safe_dump_all(docs)
    for w in workloads(docs):
        for c in containers(w):
            for part in ("requests", "limits"):
                assert all(not k.endswith("/gpu") for k in c["resources"].get(part, {})), c["name"]


def test_policy_mounts_a_memory_backed_dev_shm(overlay):
    name, docs = overlay
    policy = one(docs, "Deployment", "rlhf-policy")
    volumes = {v["name"]: v for v in pod_spec(policy)["volumes"]}
    mounts = [m for m in pod_spec(policy)["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(mounts) == 1, f"overlays/{name}: the policy has no /dev/shm mount"
    shm = volumes[mounts[0]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    if name == "gpu":
        assert shm["emptyDir"]["sizeLimit"] in ("8Gi", "16Gi", "32Gi", "64Gi"), "NCCL/vLLM want GiBs of shm on GPU"


def test_args_are_flags_the_cli_has(overlay):
    # parse_cli fails the test on any flag services.cli does not declare.
    _, docs = overlay
    commands = {parse_cli(c).target for w in workloads(docs) for c in containers(w)}
    assert commands == set(HEALTH_NAME), commands


@pytest.mark.parametrize("args", [
    ["serve", "policy", "--model=/m", "--metric-port=1"],   # no such flag
    ["serve", "policy", "--model=/m", "--metrics=1"],       # an abbreviation
    ["train", "ppo", "--resum"],                            # an abbreviation
    ["serve", "reward", "--model=/m", "--http-port=http"],  # not a number
])
def test_a_wrong_flag_is_caught(args):
    # The control for the test above: a bad command line must fail, not pass quietly.
    with pytest.raises(pytest.fail.Exception, match="rejected by services.cli"):
        parse_cli({"name": "x", "command": ["rlhf"], "args": args})


def test_grpc_probes_use_the_server_port_and_health_name(overlay):
    name, docs = overlay
    servers = list(server_containers(docs))
    assert len(servers) == 3
    for w, c, args, health in servers:
        where = f"overlays/{name}: {w['metadata']['name']}/{c['name']}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{where} has no {probe}"
            grpc = c[probe].get("grpc")
            assert grpc is not None, f"{where}: {probe} is not a native gRPC probe"
            # A gRPC probe's port must be a number (named ports are not allowed there).
            assert isinstance(grpc["port"], int) and grpc["port"] == args.port, f"{where}: {probe} port"
            assert grpc.get("service") == health, f"{where}: {probe} asks for {grpc.get('service')!r}"
        startup = c["startupProbe"]
        # Loading a model (and vLLM's warm-up) takes minutes on a big model:
        # give it at least ten before the kubelet restarts the container.
        assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 600, where


def test_container_ports_are_the_ports_the_servers_bind(overlay):
    _, docs = overlay
    for w, c, args, _ in server_containers(docs):
        assert args.host == "0.0.0.0", c["name"]  # reachable from the Service, not only loopback
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == args.port, c["name"]
        assert ports["metrics"] == args.metrics_port != 0, c["name"]
        if getattr(args, "http_port", 0):
            assert ports["http"] == args.http_port


def test_termination_grace_outlasts_the_drain(overlay):
    name, docs = overlay
    for w, c, args, _ in server_containers(docs):
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = pod_spec(w).get("terminationGracePeriodSeconds", 30)
        assert grace > pre_stop + args.grace_seconds, \
            f"overlays/{name}: {w['metadata']['name']} is killed after {grace}s, before its drain " \
            f"({pre_stop}s preStop + {args.grace_seconds}s --grace-seconds) ends"


def test_images_are_pinned(overlay):
    name, docs = overlay
    for w in workloads(docs):
        for c in containers(w):
            image = c["image"]
            if "@sha256:" in image:
                continue
            repo, _, tag = image.rpartition(":")
            assert repo and "/" not in tag, f"overlays/{name}: {image} has no tag"
            assert tag != "latest", f"overlays/{name}: {image} is not pinned"


def test_security_contexts(overlay):
    name, docs = overlay
    for w in workloads(docs):
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert not any("hostPath" in v for v in volumes.values())
        for c in containers(w):
            sc = c["securityContext"]
            where = f"overlays/{name}: {w['metadata']['name']}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc.get("privileged", False) is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            # With a read-only root, every place the process writes must be a
            # writable volume: caches, HOME, TMPDIR, /tmp.
            writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")
                        and ("emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]])]
            assert "/tmp" in writable, where
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TMPDIR", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT",
                        "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"):
                if var in env:
                    assert any(env[var] == p or env[var].startswith(p.rstrip("/") + "/") for p in writable), \
                        f"{where}: {var}={env[var]} is not on a writable volume"
            assert "HOME" in env and "XDG_CACHE_HOME" in env, where


# ---------------------------------------------------------------- auth


def test_no_token_is_committed(overlay):
    name, docs = overlay
    assert not objects(docs, "Secret"), f"overlays/{name} renders a Secret: the token must not live in git"
    for path in K8S.rglob("kustomization.yaml"):
        assert "secretGenerator" not in path.read_text(), path
    # The Secret the pods mount is the one docs/deploy.md tells ops to create.
    doc = (REPO / "docs" / "deploy.md").read_text()
    for w in workloads(docs):
        spec = pod_spec(w)
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert set(secrets.values()) == {"rlhf-auth"}, w["metadata"]["name"]
        # ... with the key the flags read (the file name in the mount).
        assert re.search(r"kubectl (-n rlhf )?create secret generic rlhf-auth --from-file=token=", doc)
        for c in containers(w):
            args = parse_cli(c)
            mounts = {m["mountPath"] for m in c["volumeMounts"] if secrets.get(m["name"])}
            for flag in ("auth_token_file", "client_auth_token_file"):
                path = getattr(args, flag, None)
                if args.target in HEALTH_NAME and flag == "auth_token_file":
                    assert path, f"{c['name']}: auth is off (no --auth-token-file)"
                if path:
                    assert any(path == m.rstrip("/") + "/token" for m in mounts), \
                        f"{c['name']}: --{flag.replace('_', '-')} {path} is not the Secret's key `token`"
            assert not any(e["name"] == "RLHF_AUTH_TOKEN" and "value" in e for e in c.get("env", [])), c["name"]


# ---------------------------------------------------------------- services, scraping, network


def test_services_reach_real_container_ports(overlay):
    name, docs = overlay
    for svc in objects(docs, "Service"):
        pods = selected_by(svc["spec"]["selector"], docs)
        assert pods, f"overlays/{name}: Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            for w in pods:
                port_number(pod_spec(w)["containers"][0], port.get("targetPort", port["port"]))


def test_trainer_config_points_at_the_services(overlay):
    _, docs = overlay
    job = one(docs, "Job", "rlhf-trainer")
    args = parse_cli(pod_spec(job)["containers"][0])
    assert args.resume, "the trainer must continue from its checkpoint after a restart"
    mounts = {m["mountPath"]: m for m in pod_spec(job)["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    config_dir, _, key = args.config.rpartition("/")
    cm_name = volumes[mounts[config_dir]["name"]]["configMap"]["name"]
    config = yaml.safe_load(one(docs, "ConfigMap", cm_name)["data"][key])
    assert {"policy_addresses", "reward_address", "sft_model", "reward_model", "prompts", "out", "steps",
            "rollout", "ppo"} <= config.keys()
    # Checkpoints go to the PersistentVolumeClaim, which is what --resume reads.
    out = args.out or config["out"]
    assert args.out is None or args.out == config["out"]
    ckpt = [m for p, m in mounts.items() if out.startswith(p.rstrip("/") + "/")]
    assert ckpt and volumes[ckpt[0]["name"]]["persistentVolumeClaim"]["claimName"] == "rlhf-checkpoints"
    assert not ckpt[0].get("readOnly")
    for path in (config["sft_model"], config["reward_model"], config["prompts"]):
        assert any(path.startswith(p.rstrip("/") + "/") for p in mounts), f"{path} is not mounted in the trainer"
    for address, headless in [(a, "rlhf-policy-headless") for a in config["policy_addresses"]] + \
                             [(config["reward_address"], "rlhf-reward-headless")]:
        m = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", address)
        assert m, f"{address}: replicas are reached through DNS (round_robin), dns:///NAME:PORT"
        svc = one(docs, "Service", m.group(1))
        assert svc["metadata"]["name"] == headless and svc["spec"]["clusterIP"] == "None"
        assert int(m.group(2)) in [p["port"] for p in svc["spec"]["ports"]]


def test_trainer_job_comes_back_after_a_disruption(overlay):
    _, docs = overlay
    job = one(docs, "Job", "rlhf-trainer")["spec"]
    assert job["completions"] == 1 and job["parallelism"] == 1
    assert job["backoffLimit"] >= 3
    # A replacement starts only once the old pod is gone: one writer per run.
    assert job["podReplacementPolicy"] == "Failed"
    rules = job["podFailurePolicy"]["rules"]
    # Evictions and node drains do not use up the retries.
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert parse_cli(job["template"]["spec"]["containers"][0]).resume


def test_service_monitors_scrape_the_metrics_ports(overlay):
    name, docs = overlay
    servers = {w["metadata"]["name"]: (w, c, args) for w, c, args, _ in server_containers(docs)}
    scraped = set()
    for sm in objects(docs, "ServiceMonitor"):
        services = [s for s in objects(docs, "Service")
                    if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        # One Service per monitor: the headless twin would scrape every pod twice.
        assert len(services) == 1, f"ServiceMonitor {sm['metadata']['name']} selects {len(services)} Services"
        svc = services[0]
        for ep in sm["spec"]["endpoints"]:
            port = next(p for p in svc["spec"]["ports"] if p["name"] == ep["port"])
            for w in selected_by(svc["spec"]["selector"], docs):
                _, c, args = servers[w["metadata"]["name"]]
                assert port_number(c, port["targetPort"]) == args.metrics_port, \
                    f"overlays/{name}: {sm['metadata']['name']} scrapes a port that is not --metrics-port"
                scraped.add(w["metadata"]["name"])
    assert scraped == set(servers)


def test_pdbs_cover_policy_and_reward_and_allow_a_drain(overlay):
    _, docs = overlay
    for name in ("rlhf-policy", "rlhf-reward"):
        pdb = one(docs, "PodDisruptionBudget", name)
        assert [w["metadata"]["name"] for w in selected_by(pdb["spec"]["selector"]["matchLabels"], docs)] == [name]
        # maxUnavailable, not minAvailable: with one replica (cpu overlay) a
        # minAvailable of 1 would block every node drain.
        assert pdb["spec"].get("maxUnavailable") == 1


def allowed_sources(netpol: dict, port_name: str) -> list[dict]:
    return [peer for rule in netpol["spec"].get("ingress", [])
            if any(p["port"] == port_name for p in rule.get("ports", []))
            for peer in rule.get("from", [{}])]


def test_network_policies_admit_only_named_clients(overlay):
    _, docs = overlay
    trainer = pod_labels(one(docs, "Job", "rlhf-trainer"))
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    for name, client_label, trainer_allowed in [("rlhf-policy", "rlhf.io/policy-client", True),
                                                 ("rlhf-reward", "rlhf.io/reward-client", True),
                                                 ("rlhf-trainer", "rlhf.io/trainer-client", False)]:
        netpol = one(docs, "NetworkPolicy", name)
        assert netpol["spec"]["policyTypes"] == ["Ingress"]
        assert [w["metadata"]["name"] for w in selected_by(netpol["spec"]["podSelector"]["matchLabels"], docs)] == [name]
        for rule in netpol["spec"]["ingress"]:
            # An ingress rule without `from` or `ports` would admit everyone.
            assert rule.get("from") and rule.get("ports"), name
        grpc = allowed_sources(netpol, "grpc")
        labelled = {"namespaceSelector": {}, "podSelector": {"matchLabels": {client_label: "true"}}}
        from_trainer = [p for p in grpc if "namespaceSelector" not in p
                        and p["podSelector"]["matchLabels"].items() <= trainer.items()]
        assert labelled in grpc and bool(from_trainer) == trainer_allowed, name
        assert len(grpc) == 1 + trainer_allowed, f"{name}: gRPC is open to more than the named clients"
        assert allowed_sources(netpol, "metrics") == [prometheus], name
    # The reward's HTTP endpoint has the same clients as its gRPC one.
    reward = one(docs, "NetworkPolicy", "rlhf-reward")
    assert allowed_sources(reward, "http") == allowed_sources(reward, "grpc")


# ---------------------------------------------------------------- alerts and dashboard


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


def test_alerts_watch_what_the_issue_asks(rendered):
    rule = one(rendered["gpu"], "PrometheusRule", "rlhf")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"RLHFPolicyReplicaBehind", "RLHFRewardErrorRate", "RLHFTrainerStalled"} <= alerts.keys()
    assert {"rlhf_policy_weight_version", "rlhf_trainer_weight_version"} <= metric_names(alerts["RLHFPolicyReplicaBehind"]["expr"])
    assert 'grpc_service="rlhf.v1.RewardService"' in alerts["RLHFRewardErrorRate"]["expr"]
    assert metric_names(alerts["RLHFTrainerStalled"]["expr"]) == {"rlhf_trainer_step"}
    for r in alerts.values():
        unknown = metric_names(r["expr"]) - known_series()
        assert not unknown, f"{r['alert']} queries metrics no service exports: {unknown}"


def dashboard() -> dict:
    return json.loads((K8S / "base" / "monitoring" / "rlhf-dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_is_shipped_and_queries_real_metrics(rendered):
    cm = one(rendered["gpu"], "ConfigMap", "rlhf-grafana-dashboard")
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
        assert not names - known_series(), f"the dashboard queries metrics no service exports: {names - known_series()}"
        used |= names
    # The main metrics of each service have a panel.
    for must in ("rlhf_trainer_reward_mean", "rlhf_trainer_kl", "rlhf_trainer_weight_version",
                 "rlhf_policy_weight_version", "rlhf_policy_generated_tokens_total", "rlhf_reward_samples_total",
                 "grpc_server_handled_total", "grpc_server_handling_seconds_bucket"):
        assert must in used, must


def test_the_services_export_what_the_alerts_need():
    # The control for the two tests above: the metric list is read, not empty.
    assert {"rlhf_policy_weight_version", "rlhf_trainer_weight_version", "rlhf_trainer_step",
            "grpc_server_handled_total", "grpc_server_handling_seconds_bucket"} <= known_series()


def test_metric_name_extraction():
    assert metric_names('sum by (le, pod) (rate(a_b_bucket{namespace="$namespace", x!="y"}[$__rate_interval]))') \
        == {"a_b_bucket"}
    assert metric_names("max by (namespace) (x) - on (namespace) group_right y > 0") == {"x", "y"}


def test_promql_parses_with_promtool(tmp_path):
    """Every alert and dashboard query is valid PromQL, checked by Prometheus' own
    promtool (Debian package `prometheus`)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: install Debian's `prometheus` package (it ships promtool)")
    rule = yaml.safe_load((K8S / "base" / "monitoring" / "prometheusrule.yaml").read_text())
    groups = rule["spec"]["groups"]
    # Dashboard queries as recording rules, Grafana's variables given values.
    records = [{"record": f"dashboard:query_{i}:check",
                "expr": e.replace("$__rate_interval", "1m").replace("$namespace", "rlhf")}
               for i, e in enumerate(dashboard_exprs())]
    groups = groups + [{"name": "dashboard", "rules": records}]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
