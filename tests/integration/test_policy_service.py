"""PolicyService against real `rlhf serve policy` processes (vLLM CPU) on loopback.

Four servers, shared by every test of the module (each vLLM start costs ~30 s):
  llama_base  llama, tied embeddings, bf16, auth on   <- pushes land here
  llama_w     llama, tied, started fresh from W_llama (the reference for a push of W_llama);
              --push-idle-timeout-s 2
  qwen_base   qwen2, untied, float32                  <- pushes land here
  qwen_w      qwen2, untied, float32, fresh from W_qwen; vLLM flags --max-num-batched-tokens
              1024 --no-enable-prefix-caching, and --max-text-bytes 8 MiB
The W directories hold the tokenizer but no chat template (only tokenizer files are
copied), the base ones have the tiny model's template. All four stage pushes in one
directory, as servers sharing a node's temp dir do.
The only proof that a push worked is that greedy outputs and per-token logprobs equal
those of a fresh server started from the same weights, so that is what the tests compare.
Tests run in file order and move the served versions forward.
"""
from __future__ import annotations

import os
import pathlib
import re
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import xxhash

from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.v1 import common_pb2, policy_pb2
from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command
from services.policy.client import PolicyClient, plan_push, weight_messages

pytestmark = pytest.mark.vllm

SERVICE = "rlhf.v1.PolicyService"
TOKEN = "policy-test-token"
PROMPTS = ["hello there", "the cat sat on", [5, 17, 9, 33, 2, 41], "a"]
GREEDY = dict(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=True)


def _perturbed(base_dir, out_dir, seed):
    """W: the base model with every weight moved, saved with save_pretrained. Returns the
    model (its state_dict is what a trainer would push, tied alias included)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out_dir)
    for f in base_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, out_dir / f.name)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from services.demo.tiny_model import build_model

    root = tmp_path_factory.mktemp("policy_models")
    out = {}
    for arch, tied in (("llama", True), ("qwen2", False)):
        base = build_model("policy", root / f"{arch}_base", arch=arch, tie_embeddings=tied, seed=1)
        w_dir = root / f"{arch}_w"
        w = _perturbed(base, w_dir, seed=2)
        base_model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
        out[arch] = dict(base=base, w=w_dir, w_state=w.state_dict(), base_state=base_model.state_dict())
    return out


MAX_TEXT_BYTES_QWEN_W = 8 << 20


@pytest.fixture(scope="module")
def staging(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("policy_staging")


@pytest.fixture(scope="module")
def servers(models, staging, tmp_path_factory):
    logs = tmp_path_factory.mktemp("policy_logs")
    specs = {
        "llama_base": (models["llama"]["base"], ["--dtype", "bfloat16"], {"RLHF_AUTH_TOKEN": TOKEN}),
        "llama_w": (models["llama"]["w"], ["--dtype", "bfloat16", "--push-idle-timeout-s", "2"],
                    {"RLHF_AUTH_TOKEN": TOKEN}),
        "qwen_base": (models["qwen2"]["base"], ["--dtype", "float32"], {"RLHF_AUTH_TOKEN": ""}),
        "qwen_w": (models["qwen2"]["w"], ["--dtype", "float32", "--max-num-batched-tokens", "1024",
                                          "--no-enable-prefix-caching", "--max-text-bytes", str(MAX_TEXT_BYTES_QWEN_W)],
                   {"RLHF_AUTH_TOKEN": ""}),
    }
    running = {}
    try:
        for name, (model_dir, extra, env) in specs.items():
            port, metrics_port = free_port(), free_port()
            argv = rlhf_command("serve", "policy", "--model", str(model_dir), "--host", "127.0.0.1",
                                "--port", str(port), "--metrics-port", str(metrics_port),
                                "--max-model-len", "128", "--kv-cache-gib", "1", "--gpu-memory-utilization", "0.1",
                                "--max-n", "8", "--max-prompts", "32", "--staging-dir", str(staging), *extra)
            config = ClientConfig(auth_token=env["RLHF_AUTH_TOKEN"] or None)
            s = ChildServer(argv, port=port, service=SERVICE, env={**env, "VLLM_CPU_KVCACHE_SPACE": "1"},
                            log_path=logs / f"{name}.log", client_config=config)
            s.metrics_port, s.config = metrics_port, config
            running[name] = s.start()  # start all four, then wait: the loads overlap
        for s in running.values():
            s.wait_ready()
        yield running
    finally:
        codes = {name: s.terminate() for name, s in running.items()}
    # Stopped cleanly, every server took its staging files and its lock with it.
    assert codes == {name: 0 for name in running}, codes
    assert not list(staging.iterdir()), sorted(p.name for p in staging.iterdir())


def client(servers, name, config=None) -> PolicyClient:
    s = servers[name]
    return PolicyClient(s.address, config or s.config, timeout=120)


def greedy(c: PolicyClient, prompts=PROMPTS, **kw):
    results = c.generate(prompts, **{**GREEDY, **kw})
    return [(r.prompt_token_ids, [(x.token_ids, x.logprobs) for x in r.completions]) for r in results], \
        {x.weight_version for r in results for x in r.completions}


def same_tokens(a, b, tol=1e-3) -> bool:
    """Same prompt and completion token ids; logprobs equal up to `tol`."""
    if len(a) != len(b):
        return False
    for (pa, ca), (pb, cb) in zip(a, b):
        if pa != pb or len(ca) != len(cb):
            return False
        for (ta, la), (tb, lb) in zip(ca, cb):
            if ta != tb or len(la) != len(lb) or any(abs(x - y) > tol for x, y in zip(la, lb)):
                return False
    return True


def status_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


@pytest.fixture(scope="module")
def fresh(servers):
    """Greedy outputs of every server as started (version 0), before any push."""
    out = {}
    for name in servers:
        with client(servers, name) as c:
            out[name], versions = greedy(c)
            assert versions == {0}
    return out


# ---- basics -----------------------------------------------------------------------

def test_model_info(servers, models):
    with client(servers, "llama_base") as c:
        info = c.model_info()
    assert info.architecture == "LlamaForCausalLM" and info.dtype == "bfloat16" and info.max_model_len == 128
    assert info.backend.startswith("vllm") and info.max_n == 8 and info.max_prompts == 32
    uuid.UUID(info.instance_id)
    names = {t.name for t in info.tensors}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: one tensor
    assert all(t.dtype == policy_pb2.DTYPE_BFLOAT16 for t in info.tensors)
    with client(servers, "qwen_base") as c:
        qinfo = c.model_info()
    assert qinfo.architecture == "Qwen2ForCausalLM" and "lm_head.weight" in {t.name for t in qinfo.tensors}
    assert {t.name for t in qinfo.tensors} == {k for k in models["qwen2"]["base_state"]}
    assert qinfo.instance_id != info.instance_id
    assert info.max_text_bytes == 65536  # the default, like the reward service's


def test_vllm_flags_take_effect(servers):
    """`serve policy` passes vLLM's own flags through; GetModelInfo reads the running engine's
    settings back (qwen_w: --max-num-batched-tokens 1024 --no-enable-prefix-caching)."""
    with client(servers, "qwen_w") as c:
        info = c.model_info()
    with client(servers, "qwen_base") as c:
        default = c.model_info()
    cfg, base = dict(info.engine_config), dict(default.engine_config)
    assert cfg["max_num_batched_tokens"] == "1024" and cfg["enable_prefix_caching"] == "False"
    assert base["max_num_batched_tokens"] != "1024" and base["enable_prefix_caching"] == "True"
    for key in ("max_num_seqs", "tensor_parallel_size", "dtype", "quantization", "kv_cache_dtype", "max_model_len"):
        assert key in cfg, key
    assert cfg["dtype"] == info.dtype == "float32" and cfg["max_model_len"] == "128" and cfg["max_num_seqs"] == "256"
    assert info.max_text_bytes == MAX_TEXT_BYTES_QWEN_W


def test_generate_fields_and_stream(servers, fresh):
    with client(servers, "qwen_base") as c:
        reply = c.generate(PROMPTS[:2], n=3, temperature=1.0, max_tokens=5, logprobs=True, raw=True)
        assert len(reply.results) == 2 and reply.instance_id == c.model_info().instance_id
        for r in reply.results:
            assert [x.index for x in r.completions] == [0, 1, 2]
            for x in r.completions:
                assert len(x.logprobs) == len(x.token_ids) <= 5 and all(lp <= 0 for lp in x.logprobs)
                assert x.finish_reason in (policy_pb2.FINISH_REASON_LENGTH, policy_pb2.FINISH_REASON_EOS)
        # seeded sampling is reproducible (n = 1: vLLM's CPU sampler cannot seed n > 1, refused)
        seeded = c.generate(PROMPTS[:2], n=1, temperature=1.0, seed=7, max_tokens=5, logprobs=True, raw=True)
        again = c.generate(PROMPTS[:2], n=1, temperature=1.0, seed=7, max_tokens=5, logprobs=True, raw=True)
        assert again.results == seeded.results
        with pytest.raises(grpc.RpcError) as err:
            c.generate(PROMPTS[:2], n=3, temperature=1.0, seed=7, max_tokens=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "params.seed" in err.value.details()
        # the stream yields the same greedy tokens, prompt ids first, finish reason last
        msgs = list(c.generate_stream(PROMPTS[1], **GREEDY))
        assert list(msgs[0].prompt_token_ids) == fresh["qwen_base"][1][0]
        assert [t for m in msgs for t in m.token_ids] == fresh["qwen_base"][1][1][0][0]
        assert msgs[-1].finish_reason == policy_pb2.FINISH_REASON_LENGTH
        assert all(m.finish_reason == policy_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        # stop strings / stop token ids / EOS end a completion with the right reason
        first = fresh["qwen_base"][0][1][0][0]
        r = c.generate(PROMPTS[0], temperature=0.0, max_tokens=12, stop_token_ids=[first[2]])[0].completions[0]
        assert r.finish_reason == "stop" and r.token_ids == first[:first.index(first[2]) + 1]
        text = c.generate(PROMPTS[0], temperature=0.0, max_tokens=12, ignore_eos=True)[0].completions[0].text
        assert len(text) > 3, text  # 12 greedy tokens: enough text to cut at a stop string
        stop = text[2:4]
        r = c.generate(PROMPTS[0], temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])[0].completions[0]
        assert r.finish_reason == "stop" and r.stop_string == stop and stop not in r.text


def test_seeds_are_honoured_or_refused(servers):
    """Every seed the contract accepts gives the same completion again; a negative one is
    refused (vLLM would take -1 as unseeded, silently)."""
    with client(servers, "qwen_base") as c:
        seeded = {}
        for seed in (0, 2**63 - 1):
            runs = [c.generate(PROMPTS[:2], temperature=1.0, seed=seed, max_tokens=8, logprobs=True, raw=True).results
                    for _ in range(2)]
            assert runs[0] == runs[1], seed
            seeded[seed] = runs[0]
        assert seeded[0] != seeded[2**63 - 1]  # the seed is what picks the samples
        for seed in (-1, -2**63):
            code, details = status_of(lambda: c.generate("hi", temperature=1.0, seed=seed, max_tokens=2))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "params.seed" in details, details
            assert "[0, 2^63 - 1]" in details


# ---- chat messages and text limits ------------------------------------------------

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "How do I prepare for my calculus exam?"},
        {"role": "assistant", "content": "Start early."},
        {"role": "user", "content": "And then?"}]


def test_chat_messages_are_rendered_by_the_chat_template(servers, models):
    """A conversation is templated as vLLM's chat API does (generation prompt appended);
    text stays a raw completion prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["llama"]["base"])
    want = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"])
    with client(servers, "llama_base") as c:
        [chat] = c.generate([CHAT], **GREEDY)
        assert chat.prompt_token_ids == want
        [as_ids] = c.generate([want], **GREEDY)  # the same tokens given as ids: the same completion
        assert [x.token_ids for x in chat.completions] == [x.token_ids for x in as_ids.completions]
        msgs = list(c.generate_stream(CHAT, **GREEDY))
        assert list(msgs[0].prompt_token_ids) == want
        assert [t for m in msgs for t in m.token_ids] == chat.completions[0].token_ids
        [text] = c.generate(["How do I prepare for my calculus exam?"], max_tokens=1)
        assert text.prompt_token_ids == tok("How do I prepare for my calculus exam?")["input_ids"]


def test_chat_and_text_refusals(servers):
    def refused(c, prompt):
        request = policy_pb2.GenerateRequest(prompts=[prompt], params=policy_pb2.SamplingParams(max_tokens=2))
        return status_of(lambda: c.stub.Generate(request, timeout=30))

    def messages(*pairs):
        return common_pb2.TextOrTokens(messages=common_pb2.ChatMessages(messages=[
            common_pb2.ChatMessage(role=r, content=t) for r, t in pairs]))

    with client(servers, "llama_base") as c:
        cases = [
            (common_pb2.TextOrTokens(text="x" * 65537), "prompts[0].text is 65537 bytes", "65536"),
            (common_pb2.TextOrTokens(text="é" * 32769), "prompts[0].text is 65538 bytes", "--max-text-bytes"),
            (messages(("user", "x" * 40000), ("assistant", "y" * 30000)), "prompts[0].messages.messages holds",
             "65536"),
            (messages(("user", "hi"), ("", "there")), "prompts[0].messages.messages[1].role", "empty"),
            (messages(*[("user", "hi")] * 257), "prompts[0].messages.messages", "1 to 256"),
            (common_pb2.TextOrTokens(messages=common_pb2.ChatMessages()), "prompts[0].messages.messages", "got 0"),
        ]
        for prompt, field, limit in cases:
            code, details = refused(c, prompt)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details and limit in details, details
        # at the byte limit the text passes and is tokenized: then it is too long for the model
        code, details = refused(c, common_pb2.TextOrTokens(text="x" * 65536))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_model_len" in details, details
        assert c.generate([CHAT], max_tokens=1)[0].completions  # still serving
    with client(servers, "qwen_w") as c:  # no chat template in that model directory
        code, details = refused(c, messages(("user", "hi")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompts[0].messages: the served model's tokenizer has no chat template" in details


def test_health_answers_while_a_large_prompt_is_tokenized(servers):
    """Tokenizing runs off the event loop: a 4 MiB prompt (allowed on qwen_w) takes seconds
    to tokenize, and health checks keep answering meanwhile."""
    s = servers["qwen_w"]
    big = "the cat sat on the mat and thought about calculus " * ((4 << 20) // 50)
    done, outcome = threading.Event(), []

    def generate():
        try:
            with client(servers, "qwen_w") as c:
                c.generate([big], max_tokens=1)
            outcome.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            outcome.append((e.code(), e.details()))
        finally:
            done.set()

    latencies = []
    with grpc.insecure_channel(s.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        t0 = time.monotonic()
        threading.Thread(target=generate, daemon=True).start()
        while not done.wait(0.05):
            start = time.monotonic()
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
            latencies.append(time.monotonic() - start)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        took = time.monotonic() - t0
    [(code, details)] = outcome  # tokenized (seconds), then too long for the model
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_model_len" in details, details
    # Health kept answering while the prompt was tokenized: several answers during the call, each
    # far quicker than the call (a blocked event loop would hold one for about all of it).
    assert len(latencies) >= 3 and max(latencies) < took / 2, (took, sorted(latencies)[-5:])


# ---- exactness ----------------------------------------------------------------------

@pytest.mark.parametrize("arch,base,ref,digest", [("llama", "llama_base", "llama_w", "xxh3_128"),
                                                  ("qwen2", "qwen_base", "qwen_w", "sha256")])
def test_push_equals_fresh_server(servers, models, fresh, arch, base, ref, digest):
    with client(servers, base) as c:
        assert fresh[base] != fresh[ref]  # W really differs from the base
        version = c.model_info().weight_version + 1
        # a trainer's state_dict, tied lm_head alias included; the client converts to the served dtype
        reply = c.push_weights(models[arch]["w_state"], version, chunk_bytes=64 << 10, digest=digest)
        assert reply.version == version and reply.previous_version == version - 1 and reply.tensors > 0
        outputs, versions = greedy(c)
        assert versions == {version}
        assert outputs == fresh[ref]
        assert c.model_info().weight_version == version


def test_partial_pushes_restore_the_base(servers, models, fresh):
    """Two partial pushes of the base weights (half the tensors each) bring back exactly what
    the server generated when it started from the base directory."""
    with client(servers, "qwen_base") as c:
        state = models["qwen2"]["base_state"]
        names = sorted(state)
        v = c.model_info().weight_version
        c.push_weights({k: state[k] for k in names[::2]}, v + 1, full=False)
        halfway, _ = greedy(c)
        assert halfway != fresh["qwen_base"] and halfway != fresh["qwen_w"]
        c.push_weights({k: state[k] for k in names[1::2]}, v + 2, full=False)
        outputs, versions = greedy(c)
        assert outputs == fresh["qwen_base"] and versions == {v + 2}


# ---- atomicity ----------------------------------------------------------------------

def _messages(c: PolicyClient, state, version, full=True, chunk_bytes=32 << 10):
    info = c.model_info()
    return [policy_pb2.UpdateWeightsRequest.FromString(m)
            for m in weight_messages(plan_push(state, info), version, full, info.dtype, chunk_bytes)]


def _with_header(msgs, **changes):
    msgs = [policy_pb2.UpdateWeightsRequest.FromString(m.SerializeToString()) for m in msgs]
    h = msgs[0].header
    for k, v in changes.items():
        v(h) if callable(v) else setattr(h, k, v)
    return msgs


def test_bad_pushes_change_nothing(servers, models):
    with client(servers, "llama_base") as c:
        before, versions = greedy(c)
        (v,) = versions
        stub = c.stub
        good = _messages(c, models["llama"]["base_state"], v + 1)

        def push(msgs):  # the client's channel adds the bearer token
            return stub.UpdateWeights(iter(msgs), timeout=60)

        def wrong_shape(h):
            h.tensors[0].shape[0] += 1
            h.tensors[0].nbytes += h.tensors[0].shape[1] * 2

        def wrong_dtype(h):
            h.tensors[1].dtype = policy_pb2.DTYPE_FLOAT32
            h.tensors[1].nbytes *= 2

        def unknown(h):
            h.tensors.add(name="model.layers.9.mlp.up_proj.weight", dtype=policy_pb2.DTYPE_BFLOAT16, shape=[2], nbytes=4)

        def missing(h):
            del h.tensors[-1]

        def bad_nbytes(h):
            h.tensors[0].nbytes += 2

        bad_sha = list(good)
        bad_sha[-1] = policy_pb2.UpdateWeightsRequest(commit=policy_pb2.WeightsCommit(digest=xxhash.xxh3_128(b"x").digest()))
        gap = [good[0], good[1], policy_pb2.UpdateWeightsRequest(chunk=policy_pb2.WeightsChunk(
            offset=good[2].chunk.offset + 1, data=good[2].chunk.data))] + good[3:]
        cases = {
            "wrong shape": (_with_header(good, shape=wrong_shape), grpc.StatusCode.FAILED_PRECONDITION, "shape"),
            "wrong dtype": (_with_header(good, dtype=wrong_dtype), grpc.StatusCode.FAILED_PRECONDITION, "dtype"),
            "unknown tensor": (_with_header(good, t=unknown), grpc.StatusCode.FAILED_PRECONDITION, "not a parameter"),
            "missing tensor": (_with_header(good, t=missing), grpc.StatusCode.FAILED_PRECONDITION, "misses 1"),
            "nbytes": (_with_header(good, t=bad_nbytes), grpc.StatusCode.INVALID_ARGUMENT, "nbytes"),
            "bad checksum": (bad_sha, grpc.StatusCode.INVALID_ARGUMENT, "does not match the xxh3_128"),
            "bad offsets": (gap, grpc.StatusCode.INVALID_ARGUMENT, "offset"),
            "no commit": (good[:-1], grpc.StatusCode.INVALID_ARGUMENT, "no commit"),
            "chunk first": (good[1:], grpc.StatusCode.INVALID_ARGUMENT, "header"),
            "old version": (_with_header(good, version=v), grpc.StatusCode.FAILED_PRECONDITION, "version"),
            # a version no client can hold would lock the replica for good
            "version above 2^63 - 1": (_with_header(good, version=2**64 - 1), grpc.StatusCode.INVALID_ARGUMENT,
                                       "header.version must be at most 2^63 - 1 = 9223372036854775807"),
            "chunk after the commit": (good + [good[1]], grpc.StatusCode.INVALID_ARGUMENT, "after the commit"),
            "second commit": (good + [good[-1]], grpc.StatusCode.INVALID_ARGUMENT, "commit after the commit"),
        }
        for case, (msgs, code, words) in cases.items():
            got, details = status_of(lambda: push(msgs))
            assert got == code, (case, got, details)
            assert words in details, (case, details)

        # a stream cut at a random point: the client cancels after some chunks
        import random
        cut_at = random.Random(0).randrange(2, len(good) - 2)
        sent = threading.Event()

        def slow():
            for i, m in enumerate(good):
                if i == cut_at:
                    sent.set()
                    time.sleep(30)  # never finishes: cancelled meanwhile
                yield m

        future = stub.UpdateWeights.future(slow(), timeout=60)
        sent.wait(30)
        future.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
        time.sleep(0.5)

        after, versions = greedy(c)
        assert after == before and versions == {v}
        assert c.model_info().weight_version == v
        # and a correct push still goes through afterwards
        assert push(good).version == v + 1


def test_a_client_leaving_during_apply_leaves_the_push_whole(servers, models, fresh):
    """The client goes away after its commit, while the server waits for generation in
    flight before applying. The verified push still applies (the engine finishes what it
    started), and its staged file stays the engine's: a later partial push reloads the
    other half of every layer from it and the model is still exactly W."""
    with client(servers, "llama_base") as c:
        v = c.model_info().weight_version
        w = models["llama"]["w_state"]
        # Generation in flight (8 x 32 completions) holds the apply back while the client leaves.
        pool = ThreadPoolExecutor(8)
        calls = [pool.submit(c.generate, [PROMPTS[0]] * 32, temperature=1.0, max_tokens=96, ignore_eos=True)
                 for _ in range(8)]
        time.sleep(0.1)
        committed = threading.Event()

        def stream():
            yield from _messages(c, w, v + 1)
            committed.set()  # the stream ends here: the server verifies it and waits to apply

        future = c.stub.UpdateWeights.future(stream(), timeout=60)
        assert committed.wait(30)
        time.sleep(0.2)  # the end of the stream reaches the server
        assert not all(f.done() for f in calls), "generation ended before the client left: make it longer"
        future.cancel()
        for f in calls:
            f.result(timeout=120)
        deadline = time.monotonic() + 30
        while c.model_info().weight_version != v + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.model_info().weight_version == v + 1, "a verified push was dropped when its client left"

        names = sorted(n for n in w if n != "lm_head.weight")  # tied: the server lists the embedding
        c.push_weights({k: w[k] for k in names[::2]}, v + 2, full=False)
        outputs, versions = greedy(c)
        assert versions == {v + 2} and outputs == fresh["llama_w"]
        # Leave the server as the tests after this one expect it: serving the base weights.
        c.push_weights(models["llama"]["base_state"], v + 3)
        assert greedy(c)[0] == fresh["llama_base"]


# ---- concurrency --------------------------------------------------------------------

def test_pushes_during_generation_never_mix_versions(servers, models, fresh):
    """Generate calls run while W and the base alternate; every completion's tokens are the
    greedy tokens of exactly the version it says produced it."""
    with client(servers, "qwen_base") as c:
        v0 = c.model_info().weight_version
        weights = {"base": models["qwen2"]["base_state"], "w": models["qwen2"]["w_state"]}
        expected = {"base": fresh["qwen_base"], "w": fresh["qwen_w"]}
        # qwen_base serves the base weights now (test_partial_pushes_restore_the_base)
        served = {v0: "base"}
        plan = ["w", "base", "w", "base"]
        stop = threading.Event()
        seen: list[tuple[set, list]] = []
        errors: list[BaseException] = []

        def generate_loop():
            with client(servers, "qwen_base") as gc:
                while not stop.is_set():
                    try:
                        results = gc.generate(PROMPTS, **GREEDY)
                    except BaseException as e:  # noqa: BLE001
                        errors.append(e)
                        return
                    versions = {x.weight_version for r in results for x in r.completions}
                    seen.append((versions, [(r.prompt_token_ids, [(x.token_ids, x.logprobs) for x in r.completions])
                                            for r in results]))

        with ThreadPoolExecutor(3) as pool:
            loops = [pool.submit(generate_loop) for _ in range(3)]
            for i, which in enumerate(plan):
                time.sleep(0.3)
                version = v0 + 1 + i
                assert c.push_weights(weights[which], version).version == version
                served[version] = which
            time.sleep(0.5)
            stop.set()
            for f in loops:
                f.result()
        assert not errors, errors
        assert len({tuple(sorted(v)) for v, _ in seen}) >= 2, "generation did not overlap the pushes"
        for versions, outputs in seen:
            assert len(versions) == 1, f"one Generate mixed versions {versions}"
            (version,) = versions
            # other requests share the batch here, so logprobs may differ in the last bits
            assert same_tokens(outputs, expected[served[version]]), f"completion at version {version} is not {served[version]}"


# ---- bad input ----------------------------------------------------------------------

def test_bad_requests_are_invalid_argument(servers, fresh):
    with client(servers, "qwen_base") as c:
        long_prompt = [5] * 128
        cases = [
            (dict(prompts=[]), "prompts", "[1, 32]"),
            (dict(prompts=[long_prompt]), "prompts[0]", "128"),
            (dict(prompts=["hi"], max_tokens=0), "params.max_tokens", "[1, "),
            (dict(prompts=[[5] * 100], max_tokens=40), "params.max_tokens", "[1, 28]"),
            (dict(prompts=["hi"], temperature=-0.5), "params.temperature", ">= 0"),
            (dict(prompts=["hi"], top_p=0.0), "params.top_p", "(0, 1]"),
            (dict(prompts=["hi"], top_p=1.5), "params.top_p", "(0, 1]"),
            (dict(prompts=["hi"], n=0), "params.n", "[1, 8]"),
            (dict(prompts=["hi"], n=9), "params.n", "[1, 8]"),
            (dict(prompts=["hi"], top_k=-2), "params.top_k", ">= 1"),
            (dict(prompts=["hi"], stop_token_ids=[10 ** 6]), "params.stop_token_ids[0]", "[0, "),
            (dict(prompts=[[1, 2, 10 ** 6]]), "prompts[0].token_ids", "[0, "),
            (dict(prompts=[[1, -3]]), "prompts[0].token_ids", "[0, "),
            (dict(prompts=[""]), "prompts[0].text", "empty"),
            (dict(prompts=["hi"], stop=[""]), "params.stop[0]", "256 bytes"),
            (dict(prompts=["hi"], stop=["x"] * 17), "params.stop", "16"),
            (dict(prompts=["hi"] * 33), "prompts", "[1, 32]"),
            (dict(prompts=["hi"], request_id="r" * 129), "request_id", "128"),
        ]
        for kw, field, limit in cases:
            prompts = kw.pop("prompts")
            code, details = status_of(lambda: c.stub.Generate(
                policy_pb2.GenerateRequest(prompts=[common_pb2.TextOrTokens(text=p) if isinstance(p, str) else
                                                    common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=p))
                                                    for p in prompts],
                                           params=policy_pb2.SamplingParams(**{k: v for k, v in kw.items()
                                                                               if k != "request_id"}),
                                           request_id=kw.get("request_id", "")), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (kw, code, details)
            assert field in details and limit in details, (kw, details)
        code, details = status_of(lambda: c.stub.Generate(policy_pb2.GenerateRequest(
            prompts=[common_pb2.TextOrTokens()]), timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompts[0]" in details
        code, details = status_of(lambda: list(c.generate_stream("hi", n=2)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "params.n" in details
        v = c.model_info().weight_version
        code, details = status_of(lambda: c.generate("hi", require_weight_version=v + 100))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and str(v) in details
        # still serving, and require_weight_version passes when it matches
        assert c.generate("hi", require_weight_version=v, max_tokens=2)[0].completions[0].weight_version == v


def test_update_weights_needs_the_token(servers, models):
    s = servers["llama_base"]
    with PolicyClient(s.address, ClientConfig(auth_token=None), timeout=30) as anonymous:
        code, _ = status_of(lambda: anonymous.stub.UpdateWeights(iter([policy_pb2.UpdateWeightsRequest(
            header=policy_pb2.WeightsHeader(version=10 ** 6))]), timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with PolicyClient(s.address, ClientConfig(auth_token="wrong"), timeout=30) as wrong:
        code, _ = status_of(lambda: wrong.stub.UpdateWeights(iter([policy_pb2.UpdateWeightsRequest(
            header=policy_pb2.WeightsHeader(version=10 ** 6))]), timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with client(servers, "llama_base") as c:
        assert c.model_info().weight_version < 10 ** 6


def _open_staging_files(pid: int) -> list[str]:
    fds = pathlib.Path(f"/proc/{pid}/fd")
    out = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if "rlhf-push-" in target:
            out.append(target)
    return out


def test_a_stalled_push_is_dropped_after_the_idle_timeout(servers, models):
    """A pusher that goes quiet after its header and a chunk (llama_w: --push-idle-timeout-s 2)
    gets DEADLINE_EXCEEDED; its staging file is closed, and nothing was applied."""
    s = servers["llama_w"]
    with client(servers, "llama_w") as c:
        v = c.model_info().weight_version
        msgs = _messages(c, models["llama"]["base_state"], v + 1)
        holding, release = threading.Event(), threading.Event()

        def stalled():
            yield from msgs[:2]
            holding.set()
            release.wait(60)

        t0 = time.monotonic()
        future = c.stub.UpdateWeights.future(stalled(), timeout=60)
        assert holding.wait(30)
        time.sleep(0.5)
        assert _open_staging_files(s.pid), "the push in progress should hold its staging file open"
        code, details = future.code(), future.details()
        took = time.monotonic() - t0
        release.set()
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "--push-idle-timeout-s" in details, (code, details)
        assert 1.5 < took < 30, took
        assert not _open_staging_files(s.pid)
        assert c.model_info().weight_version == v


def test_metrics(servers):
    s = servers["llama_base"]
    with client(servers, "llama_base") as c:
        version = c.model_info().weight_version
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10).read().decode()

    def value(pattern):
        m = re.search(rf"^{pattern} ([0-9.e+]+)$", text, re.M)
        assert m, pattern
        return float(m.group(1))

    def series(name) -> float:
        """The value of `name` whatever its labels (vLLM's carry engine and model_name)."""
        m = re.search(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
        assert m, name
        return float(m.group(2))

    assert value("rlhf_policy_weight_version") == version
    # requests are counted once, by the runtime (grpc_server_started_total)
    assert "rlhf_policy_requests_total" not in text
    assert value(r'grpc_server_started_total\{grpc_method="Generate",grpc_service="rlhf.v1.PolicyService",'
                 r'grpc_type="unary"\}') >= 3
    assert re.search(r'^rlhf_build_info\{.*service="policy".*version="[^"]+".*\} 1.0$', text, re.M)
    # vLLM's own series, on the same port (stats no longer switched off)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total"):
        series(name)
    assert series("vllm:generation_tokens_total") > 0 and series("vllm:prompt_tokens_total") > 0
    assert value("rlhf_policy_generated_tokens_total") > 0
    assert value("rlhf_policy_prompt_tokens_total") > 0
    assert value("rlhf_policy_time_to_first_token_seconds_count") > 0
    assert value(r'rlhf_policy_weight_updates_total\{result="ok"\}') >= 2
    assert value(r'rlhf_policy_weight_updates_total\{result="failed_precondition"\}') >= 1
    assert value("rlhf_policy_weight_update_bytes_total") > 0
    assert value("rlhf_policy_weight_update_seconds_count") >= 2


def test_idle_server_gives_the_cpu_back(servers):
    """Right after a Generate the server's processes go quiet. vLLM's worker would spin for
    a second (busy-polling its queue), taking a core from the reward service and the
    trainer on a shared CPU node: that made every PPO score phase ~20x slower."""
    import psutil

    root = psutil.Process(servers["qwen_base"].pid)
    tree = [root, *root.children(recursive=True)]

    def cpu_seconds() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in tree)

    with client(servers, "qwen_base") as c:
        c.generate(PROMPTS, **GREEDY)
        time.sleep(0.1)
        before = cpu_seconds()
        time.sleep(1.0)
        used = cpu_seconds() - before
    assert used < 0.3, f"the idle server used {used:.2f} CPU-seconds in the second after a Generate"


def test_async_client(servers, models, fresh):
    import asyncio

    from services.policy.client import AsyncPolicyClient

    async def main():
        async with AsyncPolicyClient(servers["qwen_base"].address, timeout=120) as c:
            v = (await c.model_info()).weight_version
            # the base weights are served now (the concurrency test ends on them)
            results = await c.generate(PROMPTS, **GREEDY)
            got = [(r.prompt_token_ids, [(x.token_ids, x.logprobs) for x in r.completions]) for r in results]
            assert got == fresh["qwen_base"]
            tokens = [t async for m in c.generate_stream(PROMPTS[0], **GREEDY) for t in m.token_ids]
            assert tokens == fresh["qwen_base"][0][1][0][0]
            reply = await c.push_weights(iter(models["qwen2"]["w_state"].items()), v + 1)
            assert reply.version == v + 1
            results = await c.generate(PROMPTS, **GREEDY)
            got = [(r.prompt_token_ids, [(x.token_ids, x.logprobs) for x in r.completions]) for r in results]
            assert got == fresh["qwen_w"] and {x.weight_version for r in results for x in r.completions} == {v + 1}

    asyncio.run(main())
