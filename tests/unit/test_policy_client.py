"""The policy client without a server: prompt forms, pushes of TensorRefs (the sharded
trainer's way: never the whole model at once), and what each policy module may import."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest

from rlhf.v1 import common_pb2, policy_pb2
from services.policy.client import TensorRef, generate_request, plan_push, weight_messages

INFO = policy_pb2.PolicyModelInfo(dtype="float32", tensors=[
    policy_pb2.TensorSpec(name=n, dtype=policy_pb2.DTYPE_FLOAT32, shape=s) for n, s in
    (("a", [3, 4]), ("b", [5]), ("c", [2, 2]))])


def test_prompt_forms():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    one = generate_request(chat)
    assert len(one.prompts) == 1 and one.prompts[0].WhichOneof("input") == "messages"
    assert one.prompts[0].messages == common_pb2.ChatMessages(messages=[
        common_pb2.ChatMessage(role="system", content="Be brief."), common_pb2.ChatMessage(role="user", content="Hi")])
    mixed = generate_request(["text", [1, 2, 3], chat])
    assert [p.WhichOneof("input") for p in mixed.prompts] == ["text", "token_ids", "messages"]
    assert [p.WhichOneof("input") for p in generate_request([5, 6]).prompts] == ["token_ids"]


def test_tensor_refs_are_gathered_one_at_a_time_after_the_header():
    import numpy as np  # arrays as they come (float32, C order) are sent without a copy: the weakref sees them

    calls: list[str] = []
    alive: dict[str, weakref.ref] = {}
    rng = np.random.default_rng(0)
    values = {n: rng.standard_normal(s).astype("<f4") for n, s in (("a", (3, 4)), ("b", (5,)), ("c", (2, 2)))}

    def gather(name):
        def get():
            # Every tensor gathered before this one has been dropped already.
            gc.collect()
            assert [n for n, ref in alive.items() if ref() is not None] == [], f"{calls} still held at {name}"
            calls.append(name)
            t = values[name].copy()  # a fresh tensor, as a gather makes
            alive[name] = weakref.ref(t)
            return t
        return get

    refs = [TensorRef(n, tuple(values[n].shape), gather(n)) for n in ("a", "b", "c")]
    plan = plan_push(refs, INFO)
    messages = weight_messages(plan, 7, True, "float32", chunk_bytes=16)
    header = policy_pb2.UpdateWeightsRequest.FromString(next(messages)).header
    assert calls == []  # the header needs names and shapes only
    assert [(t.name, list(t.shape), t.nbytes) for t in header.tensors] == [("a", [3, 4], 48), ("b", [5], 20),
                                                                         ("c", [2, 2], 16)]
    rest = [policy_pb2.UpdateWeightsRequest.FromString(m) for m in messages]
    assert calls == ["a", "b", "c"]  # each exactly once, in order
    gc.collect()
    assert all(ref() is None for ref in alive.values())
    sent = b"".join(m.chunk.data for m in rest[:-1])
    assert sent == b"".join(values[n].tobytes() for n in ("a", "b", "c"))


def test_a_tensor_ref_of_the_wrong_shape_stops_the_push():
    import torch

    plan = plan_push([TensorRef("a", (3, 4), lambda: torch.zeros(4, 4))], INFO)
    messages = weight_messages(plan, 7, False, "float32", chunk_bytes=16)
    next(messages)
    with pytest.raises(ValueError, match=r"tensor 'a' has 64 bytes in float32; its shape \[3, 4\] announced 48"):
        next(messages)


def test_tensor_refs_and_pairs_do_not_mix():
    import torch

    with pytest.raises(TypeError, match="not a mix"):
        plan_push([TensorRef("a", (3, 4), lambda: None), ("b", torch.zeros(5))], INFO)


def test_what_each_policy_module_imports():
    """The walls: the core (engine, worker, limits, weights, results) imports no gRPC,
    protobuf or contracts; the client and the server no torch or vLLM; the client not the
    receiving side; the server not the client."""
    def imported(module: str) -> set[str]:
        code = f"import sys, {module}; print(' '.join(sys.modules))"
        return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.split())

    for core in ("engine", "worker", "limits", "weights", "results"):
        bad = {m for m in imported(f"services.policy.{core}") if m.split(".")[0] in ("grpc", "rlhf")
               or m.startswith("google.protobuf")}
        assert not bad, (core, sorted(bad)[:5])
    for transport in ("client", "server", "main", "relay"):
        mods = imported(f"services.policy.{transport}")
        assert not mods & {"torch", "vllm", "transformers", "numpy"}, transport
    client = imported("services.policy.client")
    assert not client & {"services.policy.weights", "services.policy.engine", "services.policy.server"}
    assert "services.policy.client" not in imported("services.policy.server")
    assert "services.policy.client" not in imported("services.policy.relay")
