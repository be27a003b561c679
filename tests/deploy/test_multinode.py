"""The trainer across nodes (overlays/gpu-multinode): a Kubeflow PyTorchJob
(training operator v1, kubeflow.org/v1) of W pods x G GPUs, each running
torchrun with the operator's PET_* environment.

Checked offline: the rendered PyTorchJob against the operator's own CRD schema
(tests/deploy/kubeflow.org_pytorchjobs.yaml, kept with its source named) and
the rules of its admission webhook; each replica's pod against Kubernetes'
schemas; torchrun's command line, after the kubelet's $(VAR) expansion with the
environment the operator gives each replica, by torch's own parser; the `rlhf`
command it launches by ours; that the pods are the single-node Job's pods
except for what distribution changes; that only rank 0's pod is behind the
TrainerService and metrics Service; that the ranks may reach each other.
"""
from __future__ import annotations

import copy
import functools
import pathlib
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from rendered import command, env_of, objects, one, pod, pods, render, selected, volumes_of

STAGE = "overlays/gpu-multinode"
CRD = pathlib.Path(__file__).with_name("kubeflow.org_pytorchjobs.yaml")


@functools.cache
def crd_schema() -> dict:
    """The CRD's openAPIV3Schema, made strict: an object that lists its properties
    accepts no others (the API server would drop an unknown field silently)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 9,000 lines: libyaml's loader when there is one
    crd = next(d for d in yaml.load_all(CRD.read_text(), Loader=loader) if d)
    assert crd["spec"]["group"] == "kubeflow.org" and crd["spec"]["names"]["kind"] == "PyTorchJob"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
    strict(schema)
    # ObjectMeta is `type: object` in a CRD; the API server checks it. Here: the fields used.
    schema["properties"]["metadata"] = {"type": "object", "additionalProperties": False, "required": ["name"],
                                        "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                                       "labels": {"type": "object"}, "annotations": {"type": "object"}}}
    return schema


def job() -> dict:
    return one(render(STAGE), "PyTorchJob", "rlhf-trainer")


def replicas(j: dict) -> dict:
    return j["spec"]["pytorchReplicaSpecs"]


def ranks(docs: list[dict]):
    """The PyTorchJob's pods (the stage also renders the policy and reward services)."""
    return [p for p in pods(docs) if p.owner["kind"] == "PyTorchJob"]


def gpu_limit(container: dict) -> int:
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


# ---------------------------------------------------------------- the custom resource


def test_the_pytorchjob_passes_the_operators_crd_schema():
    j = job()
    assert j["apiVersion"] == "kubeflow.org/v1"
    jsonschema.validate(j, crd_schema())


def test_the_crd_schema_catches_a_misspelt_field():
    # The control for the test above.
    j = job()
    j["spec"]["pytorchReplicaSpecs"]["Worker"]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(j, crd_schema())
    j = job()
    j["spec"]["runPolicy"]["backoffLimit"] = "ten"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(j, crd_schema())


def test_the_operators_webhook_would_admit_it():
    """The checks of the operator's admission webhook (pkg/webhooks/pytorch,
    v1.9): a DNS-1035 name, only Master and Worker replicas, exactly one Master,
    a container named `pytorch` with an image in each; and a restart policy it knows."""
    j = job()
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", j["metadata"]["name"])
    specs = replicas(j)
    assert set(specs) == {"Master", "Worker"}
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for role, spec in specs.items():
        named = [c for c in spec["template"]["spec"]["containers"] if c["name"] == "pytorch"]
        assert len(named) == 1 and named[0]["image"], role
        # OnFailure: a failed rank is restarted in place and the run resumes; the
        # backoffLimit bounds it (docs/deploy.md says why not ExitCode).
        assert spec["restartPolicy"] == "OnFailure", role
    assert j["spec"]["runPolicy"]["backoffLimit"] >= 3
    assert "elasticPolicy" not in j["spec"]  # a fixed world: W pods, not a range


@pytest.mark.parametrize("version", ["1.32.0", kubernetes_validate.utils.latest_version()])
def test_each_replicas_pod_passes_kubernetes_schemas(version):
    for role, spec in replicas(job()).items():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"rlhf-trainer-{role.lower()}"},
                    "template": spec["template"]}
        try:
            kubernetes_validate.validate(template, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"the {role} pod is invalid for {version}: {e.message} at {'/'.join(map(str, e.path))}")


def test_the_single_node_job_is_gone():
    docs = render(STAGE)
    assert not objects(docs, "Job"), "the single-node Job would run the same PPO run a second time"


# ---------------------------------------------------------------- what each rank runs


def test_torchrun_gets_the_world_from_the_operator():
    """W pods x G processes: torchrun's --nnodes, --nproc-per-node, --node-rank,
    --master-addr and --master-port, parsed by torch's parser after the kubelet
    expands $(PET_*) with the values the operator sets on each replica."""
    j = job()
    nodes = sum(s["replicas"] for s in replicas(j).values())
    assert len(ranks(render(STAGE))) == nodes >= 2
    nproc = int(j["spec"]["nprocPerNode"])
    master_port = next(q["containerPort"] for q in pod(render(STAGE), "rlhf-trainer-master-0").main["ports"]
                       if q["name"] == "pytorchjob-port")
    node_ranks = []
    for p in ranks(render(STAGE)):
        cmd = command(p.main, p)
        assert cmd.kind == "torchrun", p.name
        t = cmd.launcher
        assert int(t.nnodes) == nodes, f"{p.name}: --nnodes {t.nnodes}"
        assert int(t.nproc_per_node) == nproc == gpu_limit(p.main), f"{p.name}: one process per GPU"
        assert t.master_addr == "rlhf-trainer-master-0" and t.master_port == master_port, p.name
        assert t.rdzv_backend == "static" and t.max_restarts == 0, p.name
        node_ranks.append(t.node_rank)
    assert sorted(node_ranks) == list(range(nodes))
    assert pod(render(STAGE), "rlhf-trainer-master-0").added_env["PET_NODE_RANK"] == "0"  # rank 0 is on the Master


def test_a_variable_the_operator_does_not_set_stays_unexpanded():
    # The control for the test above: a typo in $(PET_...) must not pass.
    p = pod(render(STAGE), "rlhf-trainer-worker-0")
    p.main["args"] = [a.replace("PET_NNODES", "PET_NNODE") for a in p.main["args"]]
    with pytest.raises(pytest.fail.Exception, match="PET_NNODE"):
        command(p.main, p)


def test_every_rank_runs_the_single_node_ppo_command():
    single = pod(render("overlays/gpu"), "rlhf-trainer")
    want = command(single.main, single).rlhf
    assert want.target == "services.trainer.loop:main"
    for p in ranks(render(STAGE)):
        got = command(p.main, p).rlhf
        assert got == want, f"{p.name} runs another `rlhf train ppo` than the single-node Job"


def test_the_pods_are_the_single_node_jobs_but_for_distribution():
    """Image, environment, config, volumes (the same PVCs, the same auth Secret),
    security and placement come from the single-node Job; a multi-GPU pod adds
    a memory-backed /dev/shm for NCCL and asks for G GPUs."""
    single = pod(render("overlays/gpu"), "rlhf-trainer")
    for p in ranks(render(STAGE)):
        for key in ("serviceAccountName", "automountServiceAccountToken", "enableServiceLinks", "securityContext",
                    "nodeSelector", "tolerations", "terminationGracePeriodSeconds"):
            assert p.spec.get(key) == single.spec.get(key), f"{p.name}: {key}"
        for key in ("image", "imagePullPolicy", "env", "securityContext"):
            assert p.main.get(key) == single.main.get(key), f"{p.name}: {key}"
        volumes, mounts = volumes_of(p.spec), {m["mountPath"]: m for m in p.main["volumeMounts"]}
        assert {k: v for k, v in volumes.items() if k != "shm"} == volumes_of(single.spec), p.name
        assert {k: v for k, v in mounts.items() if k != "/dev/shm"} == \
            {m["mountPath"]: m for m in single.main["volumeMounts"]}, p.name
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", p.name
        assert gpu_limit(p.main) > gpu_limit(single.main), p.name
    # The same config file: the ConfigMap (with its content hash) the single-node Job mounts.
    single_cm = volumes_of(single.spec)["config"]["configMap"]["name"]
    assert single_cm.startswith("rlhf-trainer-config-") and one(render(STAGE), "ConfigMap", single_cm)


def test_only_rank_zero_serves_and_is_probed():
    master = pod(render(STAGE), "rlhf-trainer-master-0")
    workers = [p for p in ranks(render(STAGE)) if p.role == "Worker"]
    assert workers
    assert {q["name"] for q in master.main["ports"]} == {"grpc", "metrics", "pytorchjob-port"}
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= master.main.keys()
    for p in workers:
        assert not p.main.get("ports"), f"{p.name}: a Worker serves nothing"
        assert not {"startupProbe", "readinessProbe", "livenessProbe"} & p.main.keys(), \
            f"{p.name}: a probe on a port nothing listens on would restart the rank"


def test_the_trainer_service_selects_the_master_pod_only():
    docs = render(STAGE)
    svc = one(docs, "Service", "rlhf-trainer")
    assert [p.name for p in selected(svc["spec"]["selector"], docs)] == ["rlhf-trainer-master-0"]
    # Without the operator's role label it would also select the Workers: the check can fail.
    loose = {k: v for k, v in svc["spec"]["selector"].items() if not k.startswith("training.kubeflow.org/")}
    assert len(selected(loose, docs)) == len(ranks(docs)) > 1


def test_the_ranks_reach_each_other_and_nobody_else_gains():
    docs = render(STAGE)
    trainer = ranks(docs)
    policy = one(docs, "NetworkPolicy", "rlhf-trainer-ranks")
    chosen = {p.name for p in selected(policy["spec"]["podSelector"]["matchLabels"], docs)}
    assert chosen == {p.name for p in trainer}
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule, "NCCL and gloo pick their ports at run time: every port"
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "only pods of this namespace"
    assert {p.name for p in selected(peer["podSelector"]["matchLabels"], docs)} == chosen
    # The ranks reach the policy and reward services like the single-node trainer.
    for name in ("rlhf-policy", "rlhf-reward"):
        allowed = [peer["podSelector"]["matchLabels"] for r in one(docs, "NetworkPolicy", name)["spec"]["ingress"]
                   for peer in r["from"] if "namespaceSelector" not in peer]
        assert all(any(a.items() <= p.labels.items() for a in allowed) for p in trainer), name


def test_checkpoints_are_on_a_volume_every_node_can_mount():
    docs = render(STAGE)
    for name in ("rlhf-checkpoints", "rlhf-models"):
        assert one(docs, "PersistentVolumeClaim", name)["spec"]["accessModes"] == ["ReadWriteMany"], name
    for p in ranks(docs):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes_of(p.spec).values()
                  if "persistentVolumeClaim" in v}
        assert claims == {"rlhf-checkpoints", "rlhf-models"}, p.name
        assert env_of(p.main)["HF_HUB_OFFLINE"] == "1"
