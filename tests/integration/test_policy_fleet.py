"""The weight path across a fleet, against real `rlhf serve policy` processes (vLLM CPU): delta
pushes relayed from replica to replica, the trainer's own push logic (services.trainer.rollout,
push, image) driving them, staged pushes and their commit, rollback, and replicas killed in the
middle of a push.

Four replicas of one tiny Llama with tied embeddings, served in bf16, shared by the module and
run as the manifests run them: a bearer token, a push token (--push-token-file) and mTLS, the
replicas relaying to each other with a client certificate of their own. c and d are the ones
killed (the last tests). The trainer side runs in this process on a world of one.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest
import torch

from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command
from services.policy.client import PolicyClient, PushOptions, TensorRef
from services.trainer import distributed, push, rollout
from services.trainer.image import ServedImage
from services.trainer.rollout import Backoff, PolicyReplicas, PushConfig

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SERVICE = "rlhf.v1.PolicyService"
TOKEN, PUSH_TOKEN = "fleet-token", "fleet-push-token"
PROMPTS = ["hello there", "the cat sat on", [5, 17, 9, 33, 2, 41]]
GREEDY = dict(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from services.demo.tiny_model import build_model
    return build_model("policy", tmp_path_factory.mktemp("fleet") / "policy", tie_embeddings=True, seed=4)


@pytest.fixture(scope="module")
def tls(tls_files):
    trainer = ClientConfig(auth_token=TOKEN, push_token=PUSH_TOKEN, tls_ca=str(tls_files["ca_cert"]),
                           tls_cert=str(tls_files["client_cert"]), tls_key=str(tls_files["client_key"]))
    return tls_files, trainer


@pytest.fixture(scope="module")
def fleet(model_dir, tls, tmp_path_factory):
    files, trainer_config = tls
    root = tmp_path_factory.mktemp("fleet_run")
    (root / "push-token").write_text(PUSH_TOKEN + "\n")
    servers = {}
    try:
        for name in "abcd":
            port = free_port()
            argv = rlhf_command(
                "serve", "policy", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                "--metrics-port", "0", "--max-model-len", "128", "--kv-cache-gib", "1",
                "--gpu-memory-utilization", "0.1", "--dtype", "bfloat16", "--staging-dir", str(root),
                "--push-token-file", str(root / "push-token"), "--push-idle-timeout-s", "20",
                "--tls-cert", str(files["server_cert"]), "--tls-key", str(files["server_key"]),
                "--tls-ca", str(files["ca_cert"]), "--relay-tls-cert", str(files["client_cert"]),
                "--relay-tls-key", str(files["client_key"]))
            servers[name] = ChildServer(argv, port=port, service=SERVICE,
                                        env={"RLHF_AUTH_TOKEN": TOKEN, "VLLM_CPU_KVCACHE_SPACE": "1"},
                                        log_path=root / f"{name}.log", client_config=trainer_config).start()
        for s in servers.values():
            s.wait_ready()
        yield servers
    finally:
        for s in servers.values():
            s.terminate()


def client(fleet, name, config) -> PolicyClient:
    return PolicyClient(fleet[name].address, config, timeout=120)


def greedy(c: PolicyClient):
    return [(r.prompt_token_ids, [(x.token_ids, x.logprobs) for x in r.completions]) for r in
            c.generate(PROMPTS, **GREEDY)]


@pytest.fixture(scope="module")
def trainer(model_dir, fleet, tls):
    """The trainer's side: the policy in fp32 and its optimizer, on a world of one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return dict(model=model, opt=torch.optim.AdamW(model.parameters(), lr=3e-3), d=distributed.init("cpu", "float32"))


def train_step(trainer) -> None:
    model, opt = trainer["model"], trainer["opt"]
    ids = torch.randint(4, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def replicas_of(fleet, names, tls, trainer, **push_config) -> PolicyReplicas:
    r = PolicyReplicas([fleet[n].address for n in names], tls[1], Backoff(0.05, 0.5, 30.0), 120.0, trainer["d"],
                       push=PushConfig(**push_config))
    r.refresh()
    r.version = r.max_version() + 1
    r.attach(trainer["model"])
    return r


# ---- the contract ----------------------------------------------------------------------------

def test_only_the_push_token_pushes(fleet, tls):
    """With --push-token-file, the bearer token lets a client generate, not push: every push RPC
    is PERMISSION_DENIED without the push token, and nothing moves."""
    _, trainer_config = tls
    generator = ClientConfig(auth_token=TOKEN, tls_ca=trainer_config.tls_ca, tls_cert=trainer_config.tls_cert,
                             tls_key=trainer_config.tls_key)
    with client(fleet, "a", generator) as c:
        assert c.generate("hi", max_tokens=2)[0].completions
        v = c.model_info().weight_version
        state = {t.name: torch.zeros(list(t.shape)) for t in c.model_info().tensors}
        calls = {"UpdateWeights": lambda: c.push_weights(state, v + 1), "CommitWeights": lambda: c.commit_weights(v + 1),
                 "AbortWeights": lambda: c.abort_weights(v + 1), "RollbackWeights": lambda: c.rollback_weights(v)}
        for method, call in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert f"{method} needs the push token in the 'rlhf-push-token' metadata" in e.value.details()
        assert c.model_info().weight_version == v


def test_prompt_logprobs_score_what_was_sampled(fleet, tls):
    """prompt_logprobs of prompt + completion give back the completion's own logprobs."""
    with client(fleet, "a", tls[1]) as c:
        [r] = c.generate([[5, 17, 9, 33]], temperature=1.0, seed=3, max_tokens=8, logprobs=True)
        y = r.completions[0]
        [again] = c.generate([[5, 17, 9, 33] + y.token_ids], max_tokens=1, prompt_logprobs=True)
        assert len(again.prompt_logprobs) == 4 + len(y.token_ids) - 1
        assert again.prompt_logprobs[3:] == pytest.approx(y.logprobs, abs=2e-3)
        assert c.generate("hi", max_tokens=1)[0].prompt_logprobs == []  # only when asked for


# ---- the trainer's pushes ----------------------------------------------------------------------

def test_deltas_through_a_chain_are_a_full_push_bit_for_bit(fleet, tls, trainer):
    """The whole image to every replica through one stream, then three training steps pushed as
    deltas through a chain of a and b: every replica's image digest is the trainer's, the
    trainer's egress is at most 1.1 x the payload, and a and b (partial reloads of the layers the
    deltas touched) generate exactly what c does from a full push of the same weights."""
    replicas = replicas_of(fleet, "abc", tls, trainer)
    replicas.sync()
    assert {r.weight_version for r in replicas.replicas.values()} == {replicas.version}
    c = fleet["c"].address
    for _ in range(3):
        train_step(trainer)
        replicas.version += 1
        replicas.replicas[c].available = False  # c sits these out
        stats = replicas.push_all()
        assert stats.kinds == ["delta"] and stats.ok == 2 and stats.failed == 0, stats
        assert stats.wire_bytes <= 1.1 * stats.payload_bytes and 0 < stats.changed_share < 1, stats
        assert stats.payload_bytes < 0.9 * replicas.image.elements * 2  # fewer bytes than a full push
    replicas.refresh()
    assert replicas.replicas[c].weight_version == replicas.version - 3
    replicas.sync()  # c: not at the last delta's base, so the whole image
    assert replicas.replicas[c].weight_version == replicas.version
    outputs = {}
    for name in "abc":
        with client(fleet, name, tls[1]) as cl:
            outputs[name] = greedy(cl)
            assert cl.model_info().weight_version == replicas.version
    assert outputs["a"] == outputs["b"] == outputs["c"]
    replicas.close()


def test_a_delta_on_another_base_is_refused_and_healed_by_a_full_push(fleet, tls, trainer, caplog):
    """b serves the version a delta is made against, but other bytes under it (another pusher):
    the delta names a base digest b does not have, b refuses it with FAILED_PRECONDITION, and the
    trainer sends b the whole image instead (a, not at the delta's base at all, gets it too)."""
    caplog.set_level(logging.INFO, logger="services.trainer.rollout")
    replicas = replicas_of(fleet, "ab", tls, trainer)
    replicas.sync()
    v = replicas.version
    replicas.image.advance(v + 1)  # the trainer's v + 1: the same weights
    with client(fleet, "b", tls[1]) as cb:  # b's v + 1: other bytes, which only the digest tells apart
        cb.push({name: t.float() * 1.01 for name, t in replicas.image.full()}, v + 1, "bfloat16")
    replicas.refresh()
    train_step(trainer)
    replicas.version = v + 2
    replicas._delta = replicas.image.advance(v + 2)
    stats = push.PushStats(replicas.version, elements=replicas.image.elements)
    outcomes = replicas._deliver([fleet["a"].address, fleet["b"].address], stats, stage_only=False)
    assert stats.kinds == ["delta", "full"], stats.kinds
    assert all(o.ok for o in outcomes.values()), outcomes
    refusal = next(r.getMessage() for r in caplog.records if "refused the delta" in r.getMessage())
    assert fleet["b"].address in refusal and "header.delta.image_digest" in refusal and "send a full push" in refusal
    with client(fleet, "a", tls[1]) as ca, client(fleet, "b", tls[1]) as cb:
        assert greedy(ca) == greedy(cb) and cb.model_info().weight_version == replicas.version
    replicas.close()


def test_stage_commit_abort_and_rollback(fleet, tls, trainer):
    """A staged push changes nothing until CommitWeights; AbortWeights drops it; a push kept for
    a rollback is undone by RollbackWeights (and only once); versions stay above what was served."""
    with client(fleet, "a", tls[1]) as c:
        v = c.model_info().weight_version
        before = greedy(c)
        state = {t.name: torch.randn(list(t.shape)) * 0.05 for t in c.model_info().tensors}
        staged = c.push(state, v + 1, "bfloat16", PushOptions(stage_only=True)).response
        assert staged.staged and staged.version == v + 1
        info = c.model_info()
        assert info.weight_version == v and info.staged_version == v + 1 and greedy(c) == before
        assert c.commit_weights(v + 1).version == v + 1
        changed = greedy(c)
        assert changed != before and c.model_info().staged_version == 0
        with pytest.raises(grpc.RpcError) as e:
            c.commit_weights(v + 1)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no push staged for version" in e.value.details()

        c.push(state, v + 2, "bfloat16", PushOptions(stage_only=True))
        assert c.abort_weights(v + 2) and not c.abort_weights(v + 2)
        assert c.model_info().weight_version == v + 1 and greedy(c) == changed

        with pytest.raises(grpc.RpcError) as e:
            c.rollback_weights(v + 1)  # pushed without keep_previous
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no earlier image is kept" in e.value.details()
        kept = {name: t * 2 for name, t in state.items()}
        c.push(kept, v + 3, "bfloat16", PushOptions(keep_previous=True))
        assert c.model_info().rollback_version == v + 1 and greedy(c) != changed
        back = c.rollback_weights(v + 3)
        assert back.version == v + 1 and c.model_info().weight_version == v + 1 and greedy(c) == changed
        assert c.model_info().rollback_version == 0
        with pytest.raises(grpc.RpcError) as e:
            c.push(state, v + 3, "bfloat16")  # versions only go up, across the rollback too
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and f"greater than {v + 3}" in e.value.details()
        c.push(state, v + 4, "bfloat16")


def test_a_push_that_does_not_check_is_refused_whole(fleet, tls, trainer):
    """A full push whose image digest is not the image it makes, and a delta whose entry does
    not fit its tensor: refused with the field named, nothing served changes."""
    with client(fleet, "a", tls[1]) as c:
        v, before = c.model_info().weight_version, greedy(c)
        image = ServedImage(trainer["model"], trainer["d"], "bfloat16")
        image.snapshot(v + 1)
        state = {name: t for name, t in image.full()}
        with pytest.raises(grpc.RpcError) as e:
            c.push(state, v + 1, "bfloat16", PushOptions(image_digest=b"\x07" * 16))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "header.image_digest 0707070707070707... is not the digest of the image this push makes" in \
            e.value.details()
        name = next(iter(image.shapes))
        garbage = bytes((2,)) + bytes((3,)) + b"\x01\xff\xff"  # SPARSE: 1 change at an index far past the end
        with pytest.raises(grpc.RpcError) as e:
            c.push([TensorRef(name, image.shapes[name], lambda: garbage, len(garbage))], v + 1, "bfloat16",
                   PushOptions(full=False, delta_base=v))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"header.tensors[0] ({name!r}): its delta entry does not fit the tensor" in e.value.details()
        assert c.model_info().weight_version == v and greedy(c) == before


def test_a_tree_reaches_every_replica(fleet, tls, trainer):
    """Fan-out 2: a passes the push to b and c, b to d; the answer holds all four outcomes."""
    clients = {n: client(fleet, n, tls[1]) for n in "abcd"}
    try:
        v = max(c.model_info().weight_version for c in clients.values()) + 1
        image = ServedImage(trainer["model"], trainer["d"], "bfloat16")
        image.snapshot(v)
        refs = [TensorRef(name, image.shapes[name], lambda t=t: t) for name, t in image.full()]
        by_address = {fleet[n].address: c for n, c in clients.items()}
        order = [fleet[n].address for n in "abcd"]
        sent = push.stream(by_address, order, lambda: refs, v, "bfloat16",
                           PushOptions(full=True, image_digest=image.digest), fanout=2, retry=False)
        assert {a: o.code for a, o in sent.outcomes.items()} == {a: "OK" for a in order}
        assert sent.sent_bytes <= 1.1 * sent.payload_bytes
        assert {c.model_info().weight_version for c in clients.values()} == {v}
    finally:
        for c in clients.values():
            c.close()


# ---- replicas killed mid-push (c and d: the last tests) --------------------------------------

def slow(refs: list[TensorRef], seconds: float) -> list[TensorRef]:
    """The same payload, each tensor handed over after a pause: a push that lasts."""
    def late(get):
        def slowed():
            time.sleep(seconds)
            return get()
        return slowed
    return [TensorRef(r.name, r.shape, late(r.get), r.encoded_bytes) for r in refs]


def test_a_chain_routes_around_its_killed_middle(fleet, tls, trainer):
    """a -> c -> b; c is killed with -9 while the push streams: a sends b the push itself,
    replaying what it had passed on so far, and b applies it; c commits nothing, and every
    replica that answers serves the trainer's image."""
    replicas = replicas_of(fleet, "abc", tls, trainer)
    replicas.sync()
    train_step(trainer)
    replicas.version += 1
    delta = replicas.image.advance(replicas.version)
    order = [fleet[n].address for n in "acb"]
    refs = slow(push.delta_refs(delta.entries, delta.shapes), 0.3)
    threading.Timer(1.5, fleet["c"].kill).start()
    sent = push.stream(replicas._clients(), order, lambda: refs, replicas.version, "bfloat16",
                       PushOptions(full=False, delta_base=delta.base_version, base_digest=delta.base_digest,
                                   image_digest=delta.image_digest), 1, retry=False)
    a, c, b = order
    assert not fleet["c"].alive()
    assert sent.outcomes[a].ok and sent.outcomes[b].ok, sent.outcomes
    assert not sent.outcomes[c].ok and sent.outcomes[c].code in ("UNAVAILABLE", "CANCELLED"), sent.outcomes[c]
    with client(fleet, "a", tls[1]) as ca, client(fleet, "b", tls[1]) as cb:
        assert ca.model_info().weight_version == cb.model_info().weight_version == replicas.version
        assert greedy(ca) == greedy(cb)
    replicas.close()


def test_push_commit_all_commits_nothing_when_a_replica_fails_to_stage(fleet, tls, trainer, monkeypatch):
    """push_commit all: b refuses to stage (it serves a later version than the trainer's), then d
    is killed while it stages: each time the staged push is aborted everywhere and a keeps
    serving the version before, with the same outputs."""
    replicas = replicas_of(fleet, "abd", tls, trainer, commit="all")
    replicas.sync()
    a, b, d = (fleet[n].address for n in "abd")
    with client(fleet, "a", tls[1]) as ca:
        v0, before = ca.model_info().weight_version, greedy(ca)
        # 1. b refuses: another pusher moved it past the trainer's next version
        with client(fleet, "b", tls[1]) as cb:
            cb.push({n: t for n, t in replicas.image.full()}, replicas.version + 5, "bfloat16")
        train_step(trainer)
        replicas.version += 1
        replicas.push_all()
        assert ca.model_info().weight_version == v0 and ca.model_info().staged_version == 0
        assert greedy(ca) == before and not replicas.replicas[b].available
        # 2. d dies while it stages (b left out: it is ahead). a and d are not at the last push's
        # base any more (it was aborted): they get the whole image, slowed down to last seconds.
        replicas.replicas[b].available = False
        train_step(trainer)
        replicas.version += 1
        get = rollout._Feed.get
        monkeypatch.setattr(rollout._Feed, "get", lambda feed: (time.sleep(0.25), get(feed))[1])
        threading.Timer(1.5, fleet["d"].kill).start()
        stats = replicas.push_all()
        assert stats.kinds == ["full"], stats.kinds
        assert not fleet["d"].alive() and not replicas.replicas[d].available
        info = ca.model_info()
        assert info.weight_version == v0 and info.staged_version == 0 and greedy(ca) == before
    replicas.close()
