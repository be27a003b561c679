"""The Kubernetes manifests, as rendered: what a cluster would get from
`kubectl apply -k deploy/k8s/<stage>` for each stage (every overlay, and its
prepare stage).

Each stage is rendered once with the real `kubectl kustomize` and checked
against the things that would break a deployment without any error at apply
time: a flag the CLI does not have, a probe on the wrong port or health name, a
drain cut short by the kubelet, a GPU requested where there is none, a volume
that names an object nothing creates, two stages that disagree about the volume
they share. Built-in kinds are validated strictly against Kubernetes' own
schemas; the custom resources are checked in test_monitoring.py (Prometheus
operator) and test_multinode.py (Kubeflow training operator). No cluster and no
network are needed.
"""
from __future__ import annotations

import json
import pathlib
import re

import kubernetes_validate
import pytest
import yaml

from rendered import (K8S, MAIN, PREPARE, REPO, STAGES, command, env_of, kind_of, objects, one, pod, pods,
                      port_number, render, selected, volumes_of)
from rlhf.v1 import policy_pb2, reward_pb2, trainer_pb2

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
FEEDBACK = "services.feedback.main:main"  # the one HTTP server: probes on /healthz and /readyz
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
                ("kubeflow.org/v1", "PyTorchJob")}
OPTIONAL_SECRETS = {"rlhf-fetch-credentials"}  # envFrom, optional: the fetch Job runs without it


@pytest.fixture(scope="module", params=STAGES)
def stage(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


@pytest.fixture(scope="module", params=MAIN)
def main_stage(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def servers(docs: list[dict]):
    """(pod, container, parsed `rlhf` args, health name) of every gRPC server container."""
    for p in pods(docs):
        for c in p.spec["containers"]:
            cmd = command(c, p)
            if cmd.rlhf is not None and cmd.rlhf.target in HEALTH_NAME and (p.role in ("", "Master")):
                yield p, c, cmd.rlhf, HEALTH_NAME[cmd.rlhf.target]


# ---------------------------------------------------------------- rendering and schemas


EXPECTED = {
    "main": {
        ("Namespace", "rlhf"), ("ServiceAccount", "rlhf"), ("PersistentVolumeClaim", "rlhf-models"),
        ("Deployment", "rlhf-policy"), ("Service", "rlhf-policy"), ("Service", "rlhf-policy-headless"),
        ("PodDisruptionBudget", "rlhf-policy"), ("NetworkPolicy", "rlhf-policy"),
        ("Deployment", "rlhf-reward"), ("Service", "rlhf-reward"), ("Service", "rlhf-reward-headless"),
        ("PodDisruptionBudget", "rlhf-reward"), ("NetworkPolicy", "rlhf-reward"),
        ("Service", "rlhf-trainer"), ("NetworkPolicy", "rlhf-trainer"), ("PersistentVolumeClaim", "rlhf-checkpoints"),
        ("Deployment", "rlhf-feedback"), ("Service", "rlhf-feedback"), ("PersistentVolumeClaim", "rlhf-feedback"),
        ("NetworkPolicy", "rlhf-feedback"),
    },
    "prepare": {
        ("Namespace", "rlhf"), ("ServiceAccount", "rlhf"), ("PersistentVolumeClaim", "rlhf-models"),
        ("Job", "rlhf-fetch"), ("Job", "rlhf-sft"), ("Job", "rlhf-rm"),
    },
}


def test_stage_renders_every_part(stage):
    name, docs = stage
    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    want = EXPECTED["prepare" if name in PREPARE else "main"]
    assert want <= have, f"{name} lacks {sorted(want - have)}"
    if name in MAIN:
        trainer_kind = "PyTorchJob" if name.endswith("multinode") else "Job"
        assert (trainer_kind, "rlhf-trainer") in have
        assert any(k == "ConfigMap" and n.startswith("rlhf-trainer-config") for k, n in have)
    else:
        # The prepare stage starts nothing that serves or runs PPO.
        assert not objects(docs, "Deployment") and ("Job", "rlhf-trainer") not in have
    # Everything but the Namespace itself lands in it.
    assert all(d["metadata"].get("namespace") == "rlhf" for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_pass_strict_schema_validation(stage, version):
    name, docs = stage
    checked = 0
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS:
            continue  # not in Kubernetes' schemas: test_monitoring.py, test_multinode.py
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{name}: {d['apiVersion']} {d['kind']} is not a Kubernetes {version} kind")
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {d['kind']} {d['metadata']['name']} is invalid for {version}: {e.message}"
                        f" at {'/'.join(map(str, e.path))}")
        checked += 1
    assert checked >= (6 if name in PREPARE else 15)


def test_strict_validation_rejects_an_unknown_field():
    # The control for the test above: strict mode must catch a misspelt field.
    policy = one(render("overlays/gpu"), "Deployment", "rlhf-policy")
    policy["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, KUBERNETES_VERSIONS[-1], strict=True)


def test_pods_refer_only_to_objects_that_exist(stage):
    """Every ConfigMap, PersistentVolumeClaim and ServiceAccount a pod names is in
    the render (a generated ConfigMap's hash suffix included); the only Secrets
    are the ones docs/deploy.md tells ops to create."""
    name, docs = stage
    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for p in pods(docs):
        where = f"{name}: {p.name}"
        assert ("ServiceAccount", p.spec["serviceAccountName"]) in have, where
        for v in p.spec.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in have, f"{where}: no ConfigMap {v['configMap']['name']}"
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in have, where
            if "secret" in v:
                assert v["secret"]["secretName"] == "rlhf-auth", where
        for c in p.containers:
            for source in c.get("envFrom", []):
                assert source["secretRef"]["name"] in OPTIONAL_SECRETS and source["secretRef"]["optional"], where


def test_both_stages_of_an_overlay_agree_on_what_they_share():
    """Applying prepare and then the overlay (or the other way round, later) must
    not change what the other made: the namespace (with its Pod Security
    Standard), the service account and the models volume are the same objects,
    and every single-GPU trainer pod of both stages gets the same hardware."""
    for overlay in ("gpu", "cpu", "gpu-multinode"):
        main, prep = render(f"overlays/{overlay}"), render(f"overlays/{overlay}/prepare")
        for kind, name in [("Namespace", "rlhf"), ("ServiceAccount", "rlhf"), ("PersistentVolumeClaim", "rlhf-models")]:
            assert one(main, kind, name) == one(prep, kind, name), f"{overlay}: {kind} {name} differs"
        if overlay == "gpu-multinode":
            # Its SFT and RM Jobs are the gpu overlay's (one GPU each); only the namespace differs.
            gpu_prep = render("overlays/gpu/prepare")
            assert [d for d in prep if d["kind"] != "Namespace"] == [d for d in gpu_prep if d["kind"] != "Namespace"]
            continue
        ppo = pod(main, "rlhf-trainer")
        for job in ("rlhf-sft", "rlhf-rm"):
            trainer = pod(prep, job)
            for key in ("nodeSelector", "tolerations", "securityContext", "serviceAccountName"):
                assert trainer.spec.get(key) == ppo.spec.get(key), f"{overlay}: {job} {key}"
            assert trainer.main["resources"] == ppo.main["resources"], f"{overlay}: {job} resources"
            assert trainer.main["image"] == ppo.main["image"], f"{overlay}: {job} image"
            assert env_of(trainer.main) == env_of(ppo.main), f"{overlay}: {job} env"


# ---------------------------------------------------------------- containers


def test_every_container_has_requests_and_limits(stage):
    name, docs = stage
    for p in pods(docs):
        for c in p.containers:
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= res.get(part, {}).keys(), \
                    f"{name}: {p.name}/{c['name']} lacks {part} for cpu and memory"


def gpus(container: dict) -> int:
    res = container["resources"]
    # Extended resources are requested in limits (requests, if given, must equal them).
    assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]
    return int(res["limits"]["nvidia.com/gpu"])


def on_gpu_nodes(spec: dict) -> bool:
    return spec["nodeSelector"].get("nvidia.com/gpu.present") == "true" and any(
        t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" and t.get("operator") in ("Exists", "Equal")
        for t in spec["tolerations"])


def test_gpu_overlays_put_servers_and_trainers_on_gpus():
    for stage in ("overlays/gpu", "overlays/gpu/prepare", "overlays/gpu-multinode"):
        for p in pods(render(stage)):
            if p.name in ("rlhf-fetch", "rlhf-feedback"):
                # copying files and serving a web page need no GPU
                assert "nvidia.com/gpu" not in json.dumps(p.main["resources"]), f"{stage}: {p.name}"
                continue
            assert gpus(p.main) >= 1 and on_gpu_nodes(p.spec), f"{stage}: {p.name}"


def test_cpu_overlays_ask_for_no_gpu():
    for stage in ("overlays/cpu", "overlays/cpu/prepare"):
        docs = render(stage)
        assert "nvidia.com" not in yaml.safe_dump_all(docs), stage
        for p in pods(docs):
            for c in p.containers:
                for part in ("requests", "limits"):
                    assert all(not k.endswith("/gpu") for k in c["resources"].get(part, {})), c["name"]


def test_policy_mounts_a_memory_backed_dev_shm(main_stage):
    name, docs = main_stage
    policy = pod(docs, "rlhf-policy")
    mounts = [m for m in policy.main["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(mounts) == 1, f"{name}: the policy has no /dev/shm mount"
    shm = volumes_of(policy.spec)[mounts[0]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    if "gpu" in name:
        assert shm["emptyDir"]["sizeLimit"] in ("8Gi", "16Gi", "32Gi", "64Gi"), "NCCL/vLLM want GiBs of shm on GPU"


def test_args_are_flags_the_cli_has(stage):
    # command() fails the test on any flag services.cli (or torchrun) does not declare.
    name, docs = stage
    targets = {command(c, p).rlhf.target for p in pods(docs) for c in p.containers if command(c, p).rlhf}
    want = {"services.trainer.sft:main", "services.trainer.rm:main"} if name in PREPARE else set(HEALTH_NAME) | {FEEDBACK}
    assert targets == want, targets


@pytest.mark.parametrize("args", [
    ["serve", "policy", "--model=/m", "--metric-port=1"],   # no such flag
    ["serve", "policy", "--model=/m", "--metrics=1"],       # an abbreviation
    ["train", "ppo", "--resum"],                            # an abbreviation
    ["serve", "reward", "--model=/m", "--http-port=http"],  # not a number
])
def test_a_wrong_flag_is_caught(args):
    # The control for the test above: a bad command line must fail, not pass quietly.
    with pytest.raises(pytest.fail.Exception, match="rejected by services.cli"):
        command({"name": "x", "command": ["rlhf"], "args": args})


def test_grpc_probes_use_the_server_port_and_health_name(main_stage):
    name, docs = main_stage
    found = list(servers(docs))
    assert len(found) == 3
    for p, c, args, health in found:
        where = f"{name}: {p.name}/{c['name']}"
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


def test_container_ports_are_the_ports_the_servers_bind(main_stage):
    _, docs = main_stage
    for p, c, args, _ in servers(docs):
        assert args.host == "0.0.0.0", c["name"]  # reachable from the Service, not only loopback
        ports = {q["name"]: q["containerPort"] for q in c["ports"]}
        assert ports["grpc"] == args.port, c["name"]
        assert ports["metrics"] == args.metrics_port != 0, c["name"]
        if getattr(args, "http_port", 0):
            assert ports["http"] == args.http_port


def test_a_stopping_replica_serves_until_endpoints_drop_it(main_stage):
    """The stop of a policy or reward replica (docs/deploy.md): preStop sleep,
    then SIGTERM with health NOT_SERVING while RPCs are still served for
    --drain-linger-s, then --grace-seconds for RPCs in flight; all of it, plus a
    margin for the process to exit, inside terminationGracePeriodSeconds, which
    counts from the start of the preStop hook."""
    name, docs = main_stage
    for p, c, args, _ in servers(docs):
        if p.owner["kind"] != "Deployment":
            continue
        where = f"{name}: {p.name}"
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]  # the sleep action: no shell in the image needed
        assert pre_stop >= 3, f"{where}: kube-proxy and DNS need a few seconds to drop the pod"
        assert args.drain_linger_s >= 5, f"{where}: no --drain-linger-s (or too short to outlast DNS caching)"
        grace = p.spec["terminationGracePeriodSeconds"]
        assert grace >= pre_stop + args.drain_linger_s + args.grace_seconds + 5, \
            f"{where} is killed after {grace}s, before its stop ({pre_stop}s preStop + {args.drain_linger_s}s " \
            f"linger + {args.grace_seconds}s drain + 5s to exit) ends"


def feedback_server(docs: list[dict]):
    """(pod, container, parsed `rlhf serve feedback` args) of the feedback service."""
    found = [(p, c, command(c, p).rlhf) for p in pods(docs) for c in p.spec["containers"]
             if command(c, p).rlhf is not None and command(c, p).rlhf.target == FEEDBACK]
    assert len(found) == 1, found
    return found[0]


def test_the_feedback_service_is_probed_served_and_stopped_like_the_others(main_stage):
    """The HTTP server's probes hit its port (/healthz for liveness, /readyz for readiness and the
    start, which fails from SIGTERM on); its ports are the ones it binds; its stop fits in the grace
    period as the gRPC servers' do."""
    name, docs = main_stage
    p, c, args = feedback_server(docs)
    where = f"{name}: {p.name}"
    ports = {q["name"]: q["containerPort"] for q in c["ports"]}
    assert args.host == "0.0.0.0" and ports["http"] == args.port and ports["metrics"] == args.metrics_port != 0
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and port_number(c, get["port"]) == args.port, f"{where}: {probe}"
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert p.spec["terminationGracePeriodSeconds"] >= pre_stop + args.drain_linger_s + args.grace_seconds + 5, where
    # It reaches the services through their headless names, with the token, and reads the PPO prompts.
    assert args.policy == "dns:///rlhf-policy-headless.rlhf.svc:50051", args.policy
    assert args.reward == "dns:///rlhf-reward-headless.rlhf.svc:50052", args.reward
    assert args.client_auth_token_file and args.auth_token_file
    assert readable(p, args.prompts) and args.prompts == "/models/data/prompts.jsonl"
    # SQLite: the file is on the PVC, and one pod at a time writes it.
    db = args.db.removeprefix("sqlite:///")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volume = volumes_of(p.spec)[mounts[db.rsplit("/", 1)[0]]["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "rlhf-feedback"
    deployment = one(docs, "Deployment", "rlhf-feedback")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def render_with_postgres(overlay: str) -> list[dict]:
    """`overlay` with components/feedback-postgres, rendered by kubectl from a kustomization
    beside the others (kustomize takes no absolute paths)."""
    import shutil
    import tempfile

    from rendered import kustomize

    folder = pathlib.Path(tempfile.mkdtemp(dir=K8S, prefix=".test-"))
    try:
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"../{overlay}"], "components": ["../components/feedback-postgres"]}))
        return kustomize(folder)
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_the_postgres_component_moves_the_judgments_to_a_database(overlay):
    docs = render_with_postgres(overlay)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)
    p, c, args = feedback_server(docs)
    assert args.db is None  # from the environment, so no password is on a command line
    env = {e["name"]: e for e in c["env"]}
    assert env["RLHF_FEEDBACK_DB"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-feedback-db", "key": "url"}
    assert "db" not in volumes_of(p.spec) and all(m["name"] != "db" for m in c["volumeMounts"])
    deployment = one(docs, "Deployment", "rlhf-feedback")
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not pss_violations(p.spec, p.containers, "restricted")
    # docs/deploy.md tells ops to create the Secret, as it does rlhf-auth.
    assert "create secret generic rlhf-feedback-db" in (REPO / "docs" / "deploy.md").read_text()


def test_the_trainer_drains_within_its_grace_period(main_stage):
    _, docs = main_stage
    for p, c, args, _ in servers(docs):
        if p.owner["kind"] != "Deployment":
            # SIGTERM: the step in flight finishes and a checkpoint is written
            # (minutes); the RPC drain is a small part of that.
            assert p.spec["terminationGracePeriodSeconds"] >= 120 + args.grace_seconds, p.name


def test_images_are_pinned(stage):
    name, docs = stage
    for p in pods(docs):
        for c in p.containers:
            image = c["image"]
            if "@sha256:" in image:
                continue
            repo, _, tag = image.rpartition(":")
            assert repo and "/" not in tag, f"{name}: {image} has no tag"
            assert tag != "latest", f"{name}: {image} is not pinned"


def test_security_contexts(stage):
    name, docs = stage
    for p in pods(docs):
        spec = p.spec
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        volumes = volumes_of(spec)
        assert not any("hostPath" in v for v in volumes.values())
        for c in p.containers:
            sc = c["securityContext"]
            where = f"{name}: {p.name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc.get("privileged", False) is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            # With a read-only root, every place the process writes must be a
            # writable volume: caches, HOME, TMPDIR, /tmp.
            writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")
                        and ("emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]])]
            assert "/tmp" in writable, where
            env = env_of(c)
            for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TMPDIR", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT",
                        "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"):
                if var in env:
                    assert any(env[var] == q or env[var].startswith(q.rstrip("/") + "/") for q in writable), \
                        f"{where}: {var}={env[var]} is not on a writable volume"
            if kind_of(c) != "shell":  # a shell loop writes nothing
                assert "HOME" in env and "XDG_CACHE_HOME" in env, where


# The Pod Security Standards' checks these pods could trip
# (kubernetes.io/docs/concepts/security/pod-security-standards).
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def pss_violations(spec: dict, containers: list[dict], level: str) -> list[str]:
    pod_sc = spec.get("securityContext", {})
    out = []
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        out.append("host namespaces")
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if "hostPath" in kinds or (level == "restricted" and not kinds <= RESTRICTED_VOLUMES):
            out.append(f"volume {v['name']} {kinds}")
    for c in containers:
        sc = c.get("securityContext", {})
        caps = sc.get("capabilities", {})
        if sc.get("privileged") or set(caps.get("add", [])) - BASELINE_CAPABILITIES:
            out.append(f"{c['name']}: privileged or capabilities")
        if any("hostPort" in q for q in c.get("ports", [])):
            out.append(f"{c['name']}: hostPort")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp == "Unconfined" or (level == "restricted" and seccomp not in ("RuntimeDefault", "Localhost")):
            out.append(f"{c['name']}: seccomp {seccomp}")
        if level == "restricted":
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{c['name']}: allowPrivilegeEscalation != false")
            if caps.get("drop") != ["ALL"] or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
                out.append(f"{c['name']}: capabilities not drop ALL")
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) or sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                out.append(f"{c['name']}: may run as root")
    return out


def test_the_namespace_admits_every_pod_it_will_get(stage):
    """The namespace enforces a Pod Security Standard; each pod, with what a
    controller adds to it (the training operator's init container in Workers),
    must pass it, or the controller's pod is refused and the job never starts."""
    name, docs = stage
    level = one(docs, "Namespace", "rlhf")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    assert level in ("restricted", "baseline"), level
    for p in pods(docs):
        bad = pss_violations(p.spec, p.containers + p.added_init_containers, level)
        assert not bad, f"{name}: {p.name} breaks the {level} standard the namespace enforces: {bad}"
        # Ours meet `restricted` wherever it runs; only what the operator adds may need less.
        assert not pss_violations(p.spec, p.containers, "restricted"), p.name
    if "gpu-multinode" not in name:
        assert level == "restricted", f"{name}: nothing here needs less than restricted"


def test_the_pod_security_check_catches_what_restricted_forbids():
    # The control for the test above: the operator's init container is refused by restricted.
    worker = next(p for p in pods(render("overlays/gpu-multinode")) if p.role == "Worker")
    assert pss_violations(worker.spec, worker.added_init_containers, "restricted")
    assert not pss_violations(worker.spec, worker.added_init_containers, "baseline")


# ---------------------------------------------------------------- auth


def test_no_token_is_committed(stage):
    name, docs = stage
    assert not objects(docs, "Secret"), f"{name} renders a Secret: tokens must not live in git"
    for path in K8S.rglob("kustomization.yaml"):
        assert "secretGenerator" not in path.read_text(), path
    # The Secret the servers mount is the one docs/deploy.md tells ops to create ...
    doc = (REPO / "docs" / "deploy.md").read_text()
    assert re.search(r"kubectl (-n rlhf )?create secret generic rlhf-auth --from-file=token=", doc)
    for p in pods(docs):
        secrets = {v["name"]: v["secret"]["secretName"] for v in p.spec["volumes"] if "secret" in v}
        for c in p.containers:
            args = command(c, p).rlhf
            mounts = {m["mountPath"] for m in c["volumeMounts"] if secrets.get(m["name"])}
            for flag in ("auth_token_file", "client_auth_token_file"):
                path = getattr(args, flag, None)
                if args is not None and args.target in HEALTH_NAME and flag == "auth_token_file":
                    assert path, f"{p.name}/{c['name']}: auth is off (no --auth-token-file)"
                if path:
                    # ... with the key the flags read (the file name in the mount).
                    assert any(path == m.rstrip("/") + "/token" for m in mounts), \
                        f"{c['name']}: --{flag.replace('_', '-')} {path} is not the Secret's key `token`"
            assert not any(e["name"] == "RLHF_AUTH_TOKEN" and "value" in e for e in c.get("env", [])), c["name"]


def test_only_the_trainer_and_the_replicas_hold_the_push_token(stage):
    """Weight pushes need a second token (--push-token-file), key `push-token` of the same
    Secret: the policy replicas require it (and send it when they relay), the trainer sends it,
    and no other pod mounts it."""
    name, docs = stage
    doc = (REPO / "docs" / "deploy.md").read_text()
    assert re.search(r"create secret generic rlhf-auth --from-file=token=\S+ --from-file=push-token=", doc)
    holders = set()
    for p in pods(docs):
        for v in p.spec["volumes"]:
            if v.get("secret", {}).get("secretName") == "rlhf-auth" and (
                    "items" not in v["secret"] or any(i["key"] == "push-token" for i in v["secret"]["items"])):
                holders.add(p.owner["metadata"]["name"])
        for c in p.containers:
            args = command(c, p).rlhf
            if args is None:
                continue
            flag = {"services.policy.main:main": "push_token_file",
                    "services.trainer.loop:main": "client_push_token_file"}.get(args.target)
            if flag:
                assert getattr(args, flag) == "/var/run/secrets/rlhf/push-token", f"{name}: {p.name}/{c['name']}"
    assert holders <= {"rlhf-policy", "rlhf-trainer"}, f"{name}: {holders} mount the push token"


# ---------------------------------------------------------------- services and the runs' configs


def test_services_reach_real_container_ports(main_stage):
    name, docs = main_stage
    for svc in objects(docs, "Service"):
        chosen = selected(svc["spec"]["selector"], docs)
        assert chosen, f"{name}: Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            for p in chosen:
                port_number(p.main, port.get("targetPort", port["port"]))


def mounted_config(p, path: str, docs: list[dict]) -> dict:
    """The YAML file at `path` in the pod, read from the ConfigMap mounted there."""
    mounts = {m["mountPath"]: m for m in p.main["volumeMounts"]}
    config_dir, _, key = path.rpartition("/")
    assert config_dir in mounts, f"{p.name}: {path} is not on a mounted volume"
    cm_name = volumes_of(p.spec)[mounts[config_dir]["name"]]["configMap"]["name"]
    return yaml.safe_load(one(docs, "ConfigMap", cm_name)["data"][key])


def readable(p, path: str) -> bool:
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/") for m in p.main["volumeMounts"])


def test_trainer_config_points_at_the_services(main_stage):
    _, docs = main_stage
    for p in pods(docs):
        cmd = command(p.main, p)
        if cmd.rlhf is None or cmd.rlhf.target != "services.trainer.loop:main":
            continue
        args = cmd.rlhf
        assert args.resume, "the trainer must continue from its checkpoint after a restart"
        config = mounted_config(p, args.config, docs)
        assert {"policy_addresses", "reward_address", "sft_model", "reward_model", "prompts", "out", "steps",
                "rollout", "ppo"} <= config.keys()
        # Checkpoints go to the PersistentVolumeClaim, which is what --resume reads.
        out = args.out or config["out"]
        assert args.out is None or args.out == config["out"]
        mounts = {m["mountPath"]: m for m in p.main["volumeMounts"]}
        ckpt = [m for q, m in mounts.items() if out.startswith(q.rstrip("/") + "/")]
        assert ckpt and volumes_of(p.spec)[ckpt[0]["name"]]["persistentVolumeClaim"]["claimName"] == "rlhf-checkpoints"
        assert not ckpt[0].get("readOnly")
        for path in (config["sft_model"], config["reward_model"], config["prompts"]):
            assert readable(p, path), f"{path} is not mounted in the trainer"
        for address, headless in [(a, "rlhf-policy-headless") for a in config["policy_addresses"]] + \
                                 [(config["reward_address"], "rlhf-reward-headless")]:
            m = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", address)
            assert m, f"{address}: replicas are reached through DNS (round_robin), dns:///NAME:PORT"
            svc = one(docs, "Service", m.group(1))
            assert svc["metadata"]["name"] == headless and svc["spec"]["clusterIP"] == "None"
            assert int(m.group(2)) in [q["port"] for q in svc["spec"]["ports"]]


def test_trained_models_land_where_the_services_read_them():
    """SFT writes the model the policy serves and PPO starts from; the reward
    model job writes the one the reward service serves and the value model
    starts from; each job reads inputs that its wait step waits for."""
    for hardware in ("gpu", "cpu"):
        prep, main = render(f"overlays/{hardware}/prepare"), render(f"overlays/{hardware}")
        ppo_pod = pod(main, "rlhf-trainer")
        ppo = mounted_config(ppo_pod, command(ppo_pod.main, ppo_pod).rlhf.config, main)
        served = {command(p.main, p).rlhf.target: command(p.main, p).rlhf.model
                  for p in (pod(main, "rlhf-policy"), pod(main, "rlhf-reward"))}
        for job, target, served_by, ppo_key in [("rlhf-sft", "services.trainer.sft:main", "services.policy.main:main", "sft_model"),
                                                ("rlhf-rm", "services.trainer.rm:main", "services.reward.main:main", "reward_model")]:
            p = pod(prep, job)
            args = command(p.main, p).rlhf
            assert args.target == target
            config = mounted_config(p, args.config, prep)
            out = args.out or config["out"]
            assert out == served[served_by] == ppo[ppo_key], f"{hardware}: {job} writes {out}"
            # It writes on the models volume, the one the services mount.
            models = [m for m in p.main["volumeMounts"] if out.startswith(m["mountPath"].rstrip("/") + "/")]
            assert models and not models[0].get("readOnly")
            assert volumes_of(p.spec)[models[0]["name"]]["persistentVolumeClaim"]["claimName"] == "rlhf-models"
            inputs = [args.model or config["model"], args.data or config["data"]]
            assert all(readable(p, path) for path in inputs)
            wait = next(c for c in p.spec["initContainers"] if c["name"] == "wait-for-inputs")
            assert wait["args"] == inputs, f"{job} waits for {wait['args']}, reads {inputs}"


def test_trainer_jobs_come_back_after_a_disruption_and_fail_fast_on_a_bad_config(stage):
    """Every batch Job: evictions and node drains do not use up the retries; exit
    code 2 (a bad flag or config: retrying cannot help) fails the Job at once."""
    name, docs = stage
    jobs = objects(docs, "Job")
    assert len(jobs) == (0 if name.endswith("multinode") else 1 if name in MAIN else 3), name
    for job in jobs:
        spec = job["spec"]
        where = f"{name}: Job {job['metadata']['name']}"
        assert spec["completions"] == 1 and spec["parallelism"] == 1, where
        assert spec["backoffLimit"] >= 3, where
        # A replacement starts only once the old pod is gone: one writer per run.
        assert spec["podReplacementPolicy"] == "Failed", where
        rules = spec["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert any(r["onExitCodes"]["operator"] == "In" and 2 in r["onExitCodes"]["values"] for r in fail), where
        main_names = {c["name"] for c in spec["template"]["spec"]["containers"]}
        for r in fail:  # a rule for a container that does not exist would never match
            assert r["onExitCodes"].get("containerName", next(iter(main_names))) in main_names, where
        assert spec["template"]["spec"]["restartPolicy"] == "Never", where  # podFailurePolicy requires it
    if name in MAIN and jobs:
        assert command(jobs[0]["spec"]["template"]["spec"]["containers"][0]).rlhf.resume


def test_pdbs_cover_policy_and_reward_and_allow_a_drain(main_stage):
    _, docs = main_stage
    for name in ("rlhf-policy", "rlhf-reward"):
        pdb = one(docs, "PodDisruptionBudget", name)
        assert [p.name for p in selected(pdb["spec"]["selector"]["matchLabels"], docs)] == [name]
        # maxUnavailable, not minAvailable: with one replica (cpu overlay) a
        # minAvailable of 1 would block every node drain.
        assert pdb["spec"].get("maxUnavailable") == 1


# ---------------------------------------------------------------- network


def allowed_sources(netpol: dict, port_name: str) -> list[dict]:
    return [peer for rule in netpol["spec"].get("ingress", [])
            if any(p["port"] == port_name for p in rule.get("ports", []))
            for peer in rule.get("from", [{}])]


PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def test_network_policies_admit_only_named_clients(main_stage):
    name, docs = main_stage
    trainer_pods = [p for p in pods(docs) if p.owner["metadata"]["name"] == "rlhf-trainer"]
    feedback_pods = [p for p in pods(docs) if p.owner["metadata"]["name"] == "rlhf-feedback"]
    for policy_name, client_label, trainer_allowed in [("rlhf-policy", "rlhf.io/policy-client", True),
                                                       ("rlhf-reward", "rlhf.io/reward-client", True),
                                                       ("rlhf-trainer", "rlhf.io/trainer-client", False)]:
        netpol = one(docs, "NetworkPolicy", policy_name)
        assert netpol["spec"]["policyTypes"] == ["Ingress"]
        chosen = {p.owner["metadata"]["name"] for p in selected(netpol["spec"]["podSelector"]["matchLabels"], docs)}
        assert chosen == {policy_name}, f"{name}: {policy_name} selects {chosen}"
        for rule in netpol["spec"]["ingress"]:
            # An ingress rule without `from` or `ports` would admit everyone.
            assert rule.get("from") and rule.get("ports"), policy_name
        grpc = allowed_sources(netpol, "grpc")
        labelled = {"namespaceSelector": {}, "podSelector": {"matchLabels": {client_label: "true"}}}
        from_trainer = [peer for peer in grpc if "namespaceSelector" not in peer
                        and all(peer["podSelector"]["matchLabels"].items() <= p.labels.items() for p in trainer_pods)]
        assert labelled in grpc and bool(from_trainer) == trainer_allowed, policy_name
        # The feedback service samples pairs from the policy and scores them on the reward service.
        from_feedback = [peer for peer in grpc if "namespaceSelector" not in peer
                         and all(peer["podSelector"]["matchLabels"].items() <= p.labels.items() for p in feedback_pods)]
        assert bool(from_feedback) == trainer_allowed, policy_name
        # Policy replicas pass weight pushes on to each other: their own pods, in this namespace.
        peers = [peer for peer in grpc if peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": policy_name}}}]
        assert bool(peers) == (policy_name == "rlhf-policy"), policy_name
        assert len(grpc) == 1 + 2 * trainer_allowed + len(peers), \
            f"{policy_name}: gRPC is open to more than the named clients"
    # The feedback page: the labelled clients (an ingress controller) alone.
    feedback = one(docs, "NetworkPolicy", "rlhf-feedback")
    assert allowed_sources(feedback, "http") == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"rlhf.io/feedback-client": "true"}}}]
    # The reward's HTTP endpoint has the same clients as its gRPC one.
    reward = one(docs, "NetworkPolicy", "rlhf-reward")
    assert allowed_sources(reward, "http") == allowed_sources(reward, "grpc")


def test_metrics_ports_are_open_to_prometheus_alone(main_stage):
    """The metrics ports speak plain HTTP even where gRPC uses TLS
    (docs/deploy.md): the NetworkPolicies are what guards them. Every pod with a
    metrics port is selected by a policy whose only rule for that port admits
    the monitoring namespace's Prometheus, and no policy selecting it admits
    anyone else on every port (the multi-node ranks, each other, excepted)."""
    name, docs = main_stage
    netpols = objects(docs, "NetworkPolicy")
    for p in pods(docs):
        if not any(q.get("name") == "metrics" for q in p.main.get("ports", [])):
            continue
        mine = [n for n in netpols if n["spec"]["podSelector"]["matchLabels"].items() <= p.labels.items()]
        assert mine, f"{name}: nothing guards {p.name}'s metrics port"
        metrics = [peer for n in mine for peer in allowed_sources(n, "metrics")]
        assert metrics == [PROMETHEUS], f"{name}: {p.name}'s metrics port admits {metrics}"
        for n in mine:
            for rule in n["spec"]["ingress"]:
                if "ports" in rule:
                    continue
                # All ports: only the pods of this same training job may come in.
                peers = rule["from"]
                assert peers and all(set(peer) == {"podSelector"} for peer in peers), n["metadata"]["name"]
                assert all(peer["podSelector"]["matchLabels"].items() <= p.labels.items() for peer in peers)


def test_the_paths_docs_deploy_names_exist():
    doc = (REPO / "docs" / "deploy.md").read_text()
    named = set(re.findall(r"(deploy/(?:k8s|docker)/[\w./-]*\w)", doc))
    assert len(named) >= 10
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/deploy.md names paths that do not exist: {missing}"
    # Every stage is there, and the commands apply stages that exist.
    assert not [stage for stage in STAGES if stage not in doc]
    for applied in re.findall(r"kubectl (?:apply|delete) -k deploy/k8s/([\w/-]+)", doc):
        assert applied in STAGES, applied
