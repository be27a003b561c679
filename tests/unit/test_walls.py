"""The walls between the parts (DESIGN.md, "Nevers"), checked on the source and on what importing
a module really loads:

- a core imports no grpc, protobuf or contracts (rlhf.v1): it can be tested and reused without
  the transport;
- a client or a shared (services.common) module imports no torch, vllm, transformers or numpy: a
  system that only calls the services installs grpcio and protobuf, nothing else;
- a server never imports its own client, and the front ends of one core never import each other;
- the runtime (services.common) imports no service; the reward service imports nothing of the
  trainer (which runs the training jobs), and the trainer nothing of the reward service but its
  client: what both need (the score head, padding, fitting a pair) is in services.ml and
  services.common.text;
- no service module imports the CLI (the CLI knows the services, not the other way round);
- no two modules of the project import each other, directly or round a longer cycle;
- the interceptor writes one call's bookkeeping once, whatever the RPC's shape;
- where a server or client builds a message field by field, every field it names exists in the
  contract: a renamed proto field fails here, not when the RPC first runs.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"

CORES = ["services.policy.engine", "services.policy.worker", "services.policy.limits", "services.policy.weights",
         "services.policy.results", "services.policy.options", "services.ml.head", "services.reward.batcher",
         "services.reward.scorer", "services.reward.tokens", "services.reward.rules", "services.reward.served",
         "services.reward.workers", "services.trainer.ppo",
         "services.trainer.experience", "services.trainer.logprobs", "services.trainer.distributed",
         "services.trainer.checkpoint",
         "services.trainer.formats", "services.trainer.data", "services.trainer.supervised", "services.trainer.sft",
         "services.trainer.rm", "services.trainer.config", "services.trainer.control", "services.trainer.metrics",
         "services.trainer.state", "services.ml.head", "services.ml.delta", "services.trainer.image", "services.trainer.lora",
         "services.feedback.store", "services.feedback.rules", "services.feedback.sampler"]
TRANSPORT = ("grpc", "google.protobuf", "rlhf.v1")
CLIENTS = ["services.policy.client", "services.reward.client", "services.reward.admin", "services.feedback.client"]
ML = ("torch", "vllm", "transformers", "numpy")


def module_file(module: str) -> pathlib.Path:
    path = ROOT / pathlib.Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(module: str) -> set[str]:
    """Every module named by an import statement of `module`'s source, at any depth (lazy imports
    inside functions too), absolute."""
    tree = ast.parse(module_file(module).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def starts(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def all_modules(package: str) -> list[str]:
    base = SERVICES / package.split(".")[-1]
    return sorted(f"{package}.{p.stem}" for p in base.glob("*.py") if p.stem != "__init__")


def test_the_lists_name_modules_that_exist():
    for module in CORES + CLIENTS:
        assert module_file(module).is_file(), module


@pytest.mark.parametrize("module", CORES)
def test_a_core_imports_no_transport(module):
    bad = sorted(n for n in imports(module) if starts(n, TRANSPORT))
    assert not bad, f"{module} imports {bad}"


def test_cores_load_no_transport_when_imported():
    """Importing every core loads neither grpc nor protobuf nor the contracts, through any of
    their own imports either."""
    code = ("import sys; " + "; ".join(f"import {m}" for m in CORES) +
            "; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'rlhf') "
            "or m.startswith('google.protobuf')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("module", CLIENTS + all_modules("services.common"))
def test_clients_and_shared_modules_import_no_ml(module):
    bad = sorted(n for n in imports(module) if starts(n, ML))
    assert not bad, f"{module} imports {bad}"


def test_clients_and_the_runtime_load_no_ml_when_imported():
    modules = CLIENTS + all_modules("services.common")
    code = ("import sys; " + "; ".join(f"import {m}" for m in modules) +
            f"; bad = [m for m in {ML!r} if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_relay_is_transport_without_the_client():
    """A replica passing a push on (services.policy.relay) runs in the server process: grpc and
    the wire format, no ML, and not the service's own client (a server never imports it)."""
    names = imports("services.policy.relay")
    assert not sorted(n for n in names if starts(n, ML)) and not starts_any(names, "services.policy.client")


@pytest.mark.parametrize("server, client", [("services.policy.server", "services.policy.client"),
                                            ("services.reward.server", "services.reward.client"),
                                            ("services.reward.http", "services.reward.client"),
                                            ("services.feedback.server", "services.feedback.client"),
                                            ("services.feedback.main", "services.feedback.client")])
def test_a_server_does_not_import_its_own_client(server, client):
    assert not starts_any(imports(server), client), f"{server} imports {client}"


def starts_any(names: set[str], prefix: str) -> bool:
    return any(starts(n, (prefix,)) for n in names)


def test_the_front_ends_of_one_core_do_not_import_each_other():
    assert not starts_any(imports("services.reward.server"), "services.reward.http")
    assert not starts_any(imports("services.reward.http"), "services.reward.server")


@pytest.mark.parametrize("module", all_modules("services.common"))
def test_the_runtime_imports_no_service(module):
    bad = sorted(n for n in imports(module) if starts(n, ("services.policy", "services.reward", "services.trainer",
                                                           "services.demo", "services.feedback")))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", all_modules("services.reward"))
def test_the_reward_service_imports_nothing_of_the_trainer(module):
    assert not starts_any(imports(module), "services.trainer"), module


@pytest.mark.parametrize("module", all_modules("services.trainer"))
def test_the_trainer_reads_the_feedback_database_through_its_store_alone(module):
    """`rlhf train rm --data sqlite:///...` reads judgments with the feedback service's core, never
    through its HTTP front end."""
    bad = sorted(n for n in imports(module) if starts(n, ("services.feedback",))
                 and not starts(n, ("services.feedback.store",)))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", ["services.feedback.store", "services.feedback.rules", "services.feedback.sampler"])
def test_the_feedback_core_knows_no_web_framework(module):
    bad = sorted(n for n in imports(module) if starts(n, ("aiohttp",)))
    assert not bad, f"{module} imports {bad}"


def test_a_broken_wall_is_caught(tmp_path, monkeypatch):
    """The control: the checks see an import wherever it is written."""
    source = "def f():\n    import grpc\n    from torch import nn\n"
    path = tmp_path / "services" / "policy" / "engine.py"
    path.parent.mkdir(parents=True)
    path.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert {"grpc", "torch", "torch.nn"} <= imports("services.policy.engine")


def message_fields_named(path: pathlib.Path) -> list[tuple[int, str, str]]:
    """(line, message, keyword) for every `<x>_pb2.<Message>(keyword=...)` call in the file."""
    from rlhf.v1 import common_pb2, policy_pb2, reward_pb2, trainer_pb2
    modules = {m.__name__.rsplit(".", 1)[-1]: m for m in (common_pb2, policy_pb2, reward_pb2, trainer_pb2)}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        chain, base = [node.func.attr], node.func.value
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if not (isinstance(base, ast.Name) and base.id in modules):
            continue
        message = modules[base.id]
        for name in chain:
            message = getattr(message, name)
        if not hasattr(message, "DESCRIPTOR") or not hasattr(message.DESCRIPTOR, "fields_by_name"):
            continue  # an enum's Value(), a helper
        for kw in node.keywords:
            if kw.arg is not None and kw.arg not in message.DESCRIPTOR.fields_by_name:
                found.append((node.lineno, message.DESCRIPTOR.full_name, kw.arg))
    return found


@pytest.mark.parametrize("module", ["services.policy.server", "services.policy.client", "services.policy.relay",
                                    "services.trainer.push", "services.reward.server",
                                    "services.reward.client", "services.trainer.server"])
def test_every_field_a_message_is_built_with_is_in_the_contract(module):
    unknown = message_fields_named(module_file(module))
    assert not unknown, f"{module} names fields the contract does not have (line, message, field): {unknown}"


def test_a_renamed_field_is_caught(tmp_path):
    """The control: a field the contract lacks is seen, nested messages included."""
    path = tmp_path / "server.py"
    path.write_text("from rlhf.v1 import policy_pb2\n"
                    "policy_pb2.GenerateResponse(results=[])\n"
                    "policy_pb2.SamplingParams(max_tokens=1, max_new_tokens=2)\n")
    assert message_fields_named(path) == [(3, "rlhf.v1.SamplingParams", "max_new_tokens")]


@pytest.mark.parametrize("module", all_modules("services.trainer"))
def test_the_trainer_uses_only_the_reward_services_client(module):
    bad = sorted(n for n in imports(module) if starts(n, ("services.reward",)) and not starts(n, ("services.reward.client",)))
    assert not bad, f"{module} imports {bad}: shared code belongs in services.ml or services.common"


SERVICE_PACKAGES = ("services.common", "services.policy", "services.reward", "services.trainer", "services.ml",
                    "services.demo", "services.feedback")


@pytest.mark.parametrize("module", [m for p in SERVICE_PACKAGES for m in all_modules(p)])
def test_no_service_module_imports_the_cli(module):
    assert not starts_any(imports(module), "services.cli"), f"{module} imports services.cli"


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (`from pkg import mod` counts as mod)."""
    modules = {}
    for path in (root / "services").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and m != "services"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other():
    assert cycles(import_graph(ROOT)) == []


def test_an_import_cycle_is_caught(tmp_path):
    """The control: a cycle of two modules, one of the imports lazy, and one of three."""
    pkg = tmp_path / "services" / "demo"
    pkg.mkdir(parents=True)
    (pkg / "pipeline.py").write_text("def f():\n    from services.demo import report\n")
    (pkg / "report.py").write_text("from services.demo.pipeline import f\n")
    (pkg / "a.py").write_text("import services.demo.b\n")
    (pkg / "b.py").write_text("import services.demo.c\n")
    (pkg / "c.py").write_text("from services.demo import a\n")
    assert sorted(cycles(import_graph(tmp_path))) == [["services.demo.a", "services.demo.b", "services.demo.c"],
                                                      ["services.demo.pipeline", "services.demo.report"]]


def test_the_interceptor_writes_a_calls_bookkeeping_once():
    """Unary and streaming handlers share one body (interceptor._tracked): a second copy of the
    bookkeeping (the call counted for the drain, its metrics recorded) is a second place to forget
    a fix in."""
    source = (SERVICES / "common" / "interceptor.py").read_text()
    assert source.count("owner.active.add(") == 1 and source.count("owner.active.discard(") == 1
