"""PolicyService under fuzzing, interrupted weight pushes, load, overload, bad tokens and
SIGTERM, against one real `rlhf serve policy` (vLLM CPU, tiny model) shared by the module.

The tests run in file order and the last one shuts the server down under load."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import random
import signal
import threading
import time
import types

import grpc
import pytest
import xxhash
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.demo.launch import health_status
from services.policy.client import plan_push, weight_messages

from reliability_common import (POLICY, Tally, code_of, load_bench, mib, policy_server, raw_stream_unary,
                                raw_unary, raw_unary_stream, record, staged_pushes, tree_rss)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TOKEN = "policy-reliability-token"
AUTH = ClientConfig(auth_token=TOKEN)
MAX_N, MAX_PROMPTS, MAX_RPCS, GRACE = 8, 64, 100, 30
MAX_MODEL_LEN = 512  # the tiny model's context (checked against GetModelInfo in the fixture)
FAST_REFUSAL_MS = 2500  # a refusal must come long before the 30 s deadline
BATCH = 16  # requests of one hypothesis example, sent concurrently
# No shrinking: against a live server it costs minutes, and each assertion prints its case.
FUZZ = settings(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])
IA, RE, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION
OK = grpc.StatusCode.OK
BAD_TOKENS = [None, "", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), " " + TOKEN]
FIXED_PROMPTS = ["How do I prepare for my calculus exam?", "Write a haiku about the sea.", "What is 17 times 23?"]


def greedy(stub) -> list[list[int]]:
    """The fixed request: greedy completions compared before and after every ordeal."""
    reply = stub.Generate(policy_pb2.GenerateRequest(
        prompts=[common_pb2.TextOrTokens(text=p) for p in FIXED_PROMPTS],
        params=policy_pb2.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)), timeout=120)
    return [list(c.token_ids) for r in reply.results for c in r.completions]


@pytest.fixture(scope="module")
def policy(tiny_policy_dir, reliability_logs, tmp_path_factory):
    staging = tmp_path_factory.mktemp("policy-staging")  # TMPDIR: where pushed bytes wait
    server = policy_server(tiny_policy_dir, reliability_logs, "--max-n", str(MAX_N), "--max-prompts",
                           str(MAX_PROMPTS), "--max-concurrent-rpcs", str(MAX_RPCS), "--grace-seconds", str(GRACE),
                           env={"RLHF_AUTH_TOKEN": TOKEN, "TMPDIR": str(staging)}, client_config=AUTH)
    with server:
        channel = create_channel(server.address, AUTH)
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        info = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30)
        assert info.max_model_len == MAX_MODEL_LEN and info.weight_version == 0
        pool = concurrent.futures.ThreadPoolExecutor(BATCH)
        yield types.SimpleNamespace(server=server, channel=channel, stub=stub, info=info, staging=staging,
                                    model_dir=tiny_policy_dir, pool=pool, baseline=greedy(stub))
        pool.shutdown(cancel_futures=True)
        channel.close()


def version(p) -> int:
    return p.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30).weight_version


# ---- strategies ----------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
INT32 = st.integers(-2**31, 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
F32 = lambda **kw: st.floats(width=32, **kw)  # noqa: E731


def tokens(vocab: int, lo: int = 1, hi: int = 32):
    return st.lists(st.integers(0, vocab - 1), min_size=lo, max_size=hi)


def prompt(vocab: int):
    return st.one_of(TEXT.map(lambda t: common_pb2.TextOrTokens(text=t)),
                     tokens(vocab).map(lambda ids: common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=ids))))


@st.composite
def valid_params(draw, vocab: int, stream: bool):
    p = policy_pb2.SamplingParams(max_tokens=draw(st.integers(1, 4)))
    if draw(st.booleans()):
        p.n = 1 if stream else draw(st.integers(1, 3))
    if draw(st.booleans()):
        p.temperature = draw(st.one_of(st.just(0.0), F32(min_value=0.0, max_value=2.0)))
    if draw(st.booleans()):
        p.top_p = draw(F32(min_value=0.0, max_value=1.0, exclude_min=True))
    if draw(st.booleans()):
        p.top_k = draw(st.one_of(st.sampled_from([-1, 0, 1]), st.integers(1, 2**31 - 1)))
    p.stop.extend(draw(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8),
                                max_size=2)))
    p.stop_token_ids.extend(draw(st.lists(st.integers(0, vocab - 1), max_size=2)))
    if draw(st.booleans()) and p.n <= 1:  # seed with n > 1 is refused on the CPU backend
        p.seed = draw(st.integers(0, 2**63 - 1))
    p.ignore_eos, p.logprobs = draw(st.booleans()), draw(st.booleans())
    return p


def _bad_ids(vocab: int):
    return st.one_of(st.integers(-2**31, -1), st.integers(vocab, 2**31 - 1))


# One mutation of a valid request, and the code it must get. Each takes (draw, request, vocab).
def _m_no_prompts(d, r, v):
    del r.prompts[:]
def _m_too_many_prompts(d, r, v):
    del r.prompts[:]
    r.prompts.extend(common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=[5]))
                     for _ in range(MAX_PROMPTS + d(st.integers(1, 5))))
def _m_unset_prompt(d, r, v):
    r.prompts.append(common_pb2.TextOrTokens())
def _m_empty_text(d, r, v):
    r.prompts.append(common_pb2.TextOrTokens(text=""))
def _m_empty_ids(d, r, v):
    r.prompts.append(common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds()))
def _m_bad_id(d, r, v):
    ids = d(tokens(v, 0, 8))
    ids.insert(d(st.integers(0, len(ids))), d(_bad_ids(v)))
    r.prompts.append(common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=ids)))
def _m_long_prompt(d, r, v):
    n = d(st.integers(MAX_MODEL_LEN, MAX_MODEL_LEN + 200))
    r.prompts.append(common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=[7] * n)))
def _m_n(d, r, v):
    r.params.n = d(st.one_of(st.just(0), st.integers(MAX_N + 1, 2**32 - 1)))
def _m_temperature(d, r, v):
    r.params.temperature = d(st.one_of(st.floats(max_value=-1e-30), st.sampled_from([float("nan"), float("inf"), float("-inf")])))
def _m_top_p(d, r, v):
    r.params.top_p = d(st.one_of(F32(max_value=0.0), F32(min_value=1.0, exclude_min=True), st.just(float("nan"))))
def _m_top_k(d, r, v):
    r.params.top_k = d(st.integers(-2**31, -2))
def _m_max_tokens(d, r, v):
    r.params.max_tokens = d(st.one_of(st.just(0), st.integers(MAX_MODEL_LEN, 2**32 - 1)))
def _m_stop_count(d, r, v):
    del r.params.stop[:]
    r.params.stop.extend(["x"] * d(st.integers(17, 40)))
def _m_empty_stop(d, r, v):
    r.params.stop.append("")
def _m_long_stop(d, r, v):
    r.params.stop.append("é" * d(st.integers(129, 400)))
def _m_stop_ids_count(d, r, v):
    del r.params.stop_token_ids[:]
    r.params.stop_token_ids.extend([3] * d(st.integers(17, 40)))
def _m_bad_stop_id(d, r, v):
    r.params.stop_token_ids.append(d(_bad_ids(v)))
def _m_request_id(d, r, v):
    r.request_id = d(st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=129, max_size=300)
                     .filter(lambda s: len(s.encode()) > 128))
def _m_hot(d, r, v):
    r.params.temperature = d(st.floats(min_value=2.0, max_value=1e30, exclude_min=True))
def _m_seed(d, r, v):
    r.params.seed = d(st.integers(-2**63, -1))  # vLLM would take -1 as unseeded
def _m_version(d, r, v):
    r.require_weight_version = d(st.integers(1, 2**64 - 1))  # the served version is 0 while fuzzing


MUTATIONS = {  # name: (mutation, expected code, applies to GenerateStream)
    "no prompts": (_m_no_prompts, IA, False), "too many prompts": (_m_too_many_prompts, IA, False),
    "prompt unset": (_m_unset_prompt, IA, True), "empty text": (_m_empty_text, IA, True),
    "empty token_ids": (_m_empty_ids, IA, True), "token id out of range": (_m_bad_id, IA, True),
    "prompt too long": (_m_long_prompt, IA, True), "n out of range": (_m_n, IA, True),
    "temperature": (_m_temperature, IA, True), "top_p": (_m_top_p, IA, True), "top_k": (_m_top_k, IA, True),
    "max_tokens": (_m_max_tokens, IA, True), "too many stops": (_m_stop_count, IA, True),
    "empty stop": (_m_empty_stop, IA, True), "stop too long": (_m_long_stop, IA, True),
    "too many stop ids": (_m_stop_ids_count, IA, True), "stop id out of range": (_m_bad_stop_id, IA, True),
    "request_id too long": (_m_request_id, IA, True), "wrong weight version": (_m_version, FP, True),
    "negative seed": (_m_seed, IA, True),
    # The contract says only ">= 0"; vLLM caps it at 2. Served, or refused naming the field.
    "temperature above 2": (_m_hot, {OK, IA}, True),
}


@st.composite
def generate_case(draw, vocab: int):
    """(request, expected code, what): a valid request or one with exactly one fault."""
    r = policy_pb2.GenerateRequest(prompts=draw(st.lists(prompt(vocab), min_size=1, max_size=4)),
                                   params=draw(valid_params(vocab, stream=False)),
                                   request_id=draw(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20)))
    name = draw(st.sampled_from(["valid"] * 6 + sorted(MUTATIONS)))
    if name == "valid":
        return r, {OK} | _greedy_n(r.params), name
    mutate, code, _ = MUTATIONS[name]
    mutate(draw, r, vocab)
    return r, (code if isinstance(code, set) else {code}) | _greedy_n(r.params), name


def _greedy_n(p) -> set:
    """n > 1 at temperature 0: the contract allows it, vLLM refuses it. Either n identical
    completions or INVALID_ARGUMENT naming the fields is a right answer (INTERNAL is not)."""
    greedy = p.HasField("temperature") and p.temperature < 1e-5
    return {IA} if greedy and p.HasField("n") and p.n > 1 else set()


@st.composite
def stream_case(draw, vocab: int):
    r = policy_pb2.GenerateStreamRequest(prompt=draw(prompt(vocab)), params=draw(valid_params(vocab, stream=True)))
    name = draw(st.sampled_from(["valid"] * 6 + sorted(k for k, (_, _, s) in MUTATIONS.items() if s)
                                + ["n != 1", "prompt missing"]))
    if name == "valid":
        return r, {OK}, name
    if name == "n != 1":
        r.params.n = draw(st.integers(2, MAX_N))
        return r, {IA}, name
    if name == "prompt missing":
        r.ClearField("prompt")
        return r, {IA}, name
    mutate, code, _ = MUTATIONS[name]
    g = policy_pb2.GenerateRequest(prompts=[r.prompt], params=r.params)
    mutate(draw, g, vocab)
    r.ClearField("prompt")
    if g.prompts:
        r.prompt.CopyFrom(g.prompts[-1])
    if name == "no prompts":
        r.ClearField("prompt")
    r.params.CopyFrom(g.params)
    r.require_weight_version, r.request_id = g.require_weight_version, g.request_id
    return r, code if isinstance(code, set) else {code}, name


def check_generate(request, reply, info) -> None:
    """An OK answer must be the answer the contract promises."""
    n = request.params.n if request.params.HasField("n") else 1
    assert len(reply.results) == len(request.prompts)
    for p, res in zip(request.prompts, reply.results):
        if p.WhichOneof("input") == "token_ids":
            assert list(res.prompt_token_ids) == list(p.token_ids.ids)
        assert [c.index for c in res.completions] == list(range(n))
        for c in res.completions:
            assert len(c.token_ids) <= request.params.max_tokens
            assert all(0 <= t < info.vocab_size for t in c.token_ids)
            assert c.weight_version == info.weight_version
            assert c.finish_reason in (policy_pb2.FINISH_REASON_LENGTH, policy_pb2.FINISH_REASON_STOP,
                                       policy_pb2.FINISH_REASON_EOS)
            if request.params.logprobs:
                assert len(c.logprobs) == len(c.token_ids) and all(lp <= 1e-3 for lp in c.logprobs), c.logprobs
            else:
                assert not c.logprobs
            if request.params.ignore_eos and not request.params.stop and not request.params.stop_token_ids:
                assert len(c.token_ids) == request.params.max_tokens


# ---- 1. fuzzing ----------------------------------------------------------------------------

def test_fuzz_generate(policy, request):
    tally = Tally()
    vocab = policy.info.vocab_size

    @settings(FUZZ, max_examples=120)
    @given(st.lists(generate_case(vocab), min_size=BATCH, max_size=BATCH))
    def run(cases):
        futures = [policy.stub.Generate.future(r, timeout=120) for r, _, _ in cases]
        for (r, want, what), f in zip(cases, futures):
            code, details = code_of(f)
            tally.add("Generate", code, want, what, f"{details} | request: {r}".replace("\n", " "))
            if code == OK:
                tally.check("Generate", what, check_generate, r, f.result(), policy.info)

    run()
    same = greedy(policy.stub) == policy.baseline and version(policy) == 0
    record(request, "Fuzz PolicyService.Generate (valid, or one fault each)", cases=tally.cases(),
           errors=tally.summary("Generate"), lost=0 if same else "fixed greedy answer changed",
           result=tally.result("pass: right code every case; fixed greedy answer unchanged"))
    assert same
    assert not tally.wrong, "\n".join(tally.wrong)


def _consume_stream(stub, r):
    call = stub.GenerateStream(r, timeout=120)
    try:
        msgs = list(call)
        return OK, "", msgs
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []


def test_fuzz_generate_stream(policy, request):
    tally = Tally()
    vocab = policy.info.vocab_size

    def check_stream(r, msgs):
        assert msgs and msgs[-1].finish_reason != policy_pb2.FINISH_REASON_UNSPECIFIED
        assert all(m.finish_reason == policy_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        ids = [t for m in msgs for t in m.token_ids]
        assert len(ids) <= r.params.max_tokens and all(m.index == 0 for m in msgs)
        if r.prompt.WhichOneof("input") == "token_ids":
            assert list(msgs[0].prompt_token_ids) == list(r.prompt.token_ids.ids)

    @settings(FUZZ, max_examples=100)
    @given(st.lists(stream_case(vocab), min_size=BATCH, max_size=BATCH))
    def run(cases):
        outs = list(policy.pool.map(lambda c: _consume_stream(policy.stub, c[0]), cases))
        for (r, want, what), (code, details, msgs) in zip(cases, outs):
            tally.add("GenerateStream", code, want, what, f"{details} | request: {r}".replace("\n", " "))
            if code == OK:
                tally.check("GenerateStream", what, check_stream, r, msgs)

    run()
    same = greedy(policy.stub) == policy.baseline
    record(request, "Fuzz PolicyService.GenerateStream (valid, or one fault each)", cases=tally.cases(),
           errors=tally.summary("GenerateStream"), lost=0 if same else "fixed greedy answer changed",
           result=tally.result("pass: right code every case; fixed greedy answer unchanged"))
    assert same
    assert not tally.wrong, "\n".join(tally.wrong)


def _small_tensor(info):
    """The smallest tensor the model accepts, for cheap pushes."""
    t = min(info.tensors, key=lambda t: t.nbytes)
    return t


@st.composite
def update_case(draw, info):
    """A one-tensor partial push with exactly one fault: (messages, expected code, what)."""
    spec = _small_tensor(info)
    data = draw(st.binary(min_size=spec.nbytes, max_size=spec.nbytes))
    header = policy_pb2.WeightsHeader(version=info.weight_version + 1, full=False, tensors=[
        policy_pb2.TensorSpec(name=spec.name, dtype=spec.dtype, shape=list(spec.shape), nbytes=spec.nbytes)])
    cut = draw(st.integers(1, max(1, len(data) - 1)))
    chunks = [policy_pb2.WeightsChunk(offset=0, data=data[:cut]), policy_pb2.WeightsChunk(offset=cut, data=data[cut:])]
    digest = xxhash.xxh3_128(data).digest()
    fault = draw(st.sampled_from(sorted(UPDATE_FAULTS)))
    t = header.tensors[0]
    code = UPDATE_FAULTS[fault]
    if fault == "version not above served":
        header.version = draw(st.integers(0, info.weight_version))
    elif fault == "version above 2^63 - 1":
        header.version = draw(st.integers(2**63, 2**64 - 1))
    elif fault == "no tensors":
        del header.tensors[:]
    elif fault == "duplicate name":
        header.tensors.append(t)
    elif fault == "unknown name":
        t.name = draw(st.text(max_size=30).filter(lambda s: s not in {x.name for x in info.tensors}))
    elif fault == "bad dtype enum":
        t.dtype = draw(st.one_of(st.just(0), st.integers(5, 2**31 - 1)))
    elif fault == "not the served dtype":
        t.dtype = policy_pb2.DTYPE_FLOAT64
        t.nbytes = spec.nbytes // 2 * 8
    elif fault == "negative dim":
        t.shape[0] = draw(st.integers(-2**63, -1))
    elif fault == "wrong shape":
        t.shape.append(1) if draw(st.booleans()) else t.shape.__setitem__(0, t.shape[0] * 2)
        t.nbytes = int(t.nbytes * (1 if len(t.shape) > len(spec.shape) else 2))
    elif fault == "huge shape":
        t.shape[:] = [2**31, 2**31, 2**31]
    elif fault == "wrong nbytes":
        t.nbytes = draw(st.integers(0, 2**64 - 1).filter(lambda n: n != spec.nbytes))
    elif fault == "full with one tensor":
        header.full = True
    elif fault == "offset gap":
        chunks[1].offset = draw(st.integers(0, 2**64 - 1).filter(lambda o: o != cut))
    elif fault == "overrun":
        chunks.append(policy_pb2.WeightsChunk(offset=len(data), data=draw(st.binary(min_size=1, max_size=64))))
    elif fault == "missing chunk":
        chunks.pop()
    elif fault == "digest wrong length":
        digest = draw(st.binary(max_size=64).filter(lambda b: len(b) != 16))
    elif fault == "digest mismatch":
        digest = draw(st.binary(min_size=16, max_size=16).filter(lambda b: b != digest))
    elif fault == "bad digest enum":
        header.digest = draw(st.integers(3, 2**31 - 1))
    elif fault == "sha256 digest sent for xxh3":
        digest = hashlib.sha256(data).digest()
    msgs = [policy_pb2.UpdateWeightsRequest(header=header),
            *(policy_pb2.UpdateWeightsRequest(chunk=c) for c in chunks),
            policy_pb2.UpdateWeightsRequest(commit=policy_pb2.WeightsCommit(digest=digest))]
    if fault == "chunk first":
        msgs = msgs[1:]
    elif fault == "commit first":
        msgs = msgs[-1:] + msgs
    elif fault == "empty message first":
        msgs.insert(0, policy_pb2.UpdateWeightsRequest())
    elif fault == "empty message inside":
        msgs.insert(draw(st.integers(1, len(msgs) - 1)), policy_pb2.UpdateWeightsRequest())
    elif fault == "second header":
        msgs.insert(draw(st.integers(1, len(msgs) - 1)), msgs[0])
    elif fault == "no commit":
        msgs = msgs[:draw(st.integers(1, len(msgs) - 1))]
    elif fault == "message after the commit":
        msgs.append(draw(st.sampled_from(msgs[1:])))
    elif fault == "empty stream":
        msgs = []
    return msgs, code, fault


UPDATE_FAULTS = {
    "version not above served": FP, "version above 2^63 - 1": IA, "no tensors": IA, "duplicate name": IA,
    "unknown name": FP,
    "bad dtype enum": IA, "not the served dtype": FP, "negative dim": IA, "wrong shape": FP, "huge shape": IA,
    "wrong nbytes": IA, "full with one tensor": FP, "offset gap": IA, "overrun": IA, "missing chunk": IA,
    "digest wrong length": IA, "digest mismatch": IA, "bad digest enum": IA, "sha256 digest sent for xxh3": IA, "chunk first": IA, "commit first": IA,
    "empty message first": IA, "empty message inside": IA, "second header": IA, "no commit": IA,
    "message after the commit": IA, "empty stream": IA,
}


def test_fuzz_update_weights_and_model_info(policy, request):
    tally = Tally()
    info = policy.info

    @settings(FUZZ, max_examples=150)
    @given(st.lists(update_case(info), min_size=BATCH, max_size=BATCH))
    def run(cases):
        futures = [policy.stub.UpdateWeights.future(iter(msgs), timeout=60) for msgs, _, _ in cases]
        infos = [policy.stub.GetModelInfo.future(common_pb2.GetModelInfoRequest(), timeout=60) for _ in range(4)]
        for (msgs, want, what), f in zip(cases, futures):
            code, details = code_of(f)
            tally.add("UpdateWeights", code, {want}, what, f"{details} | first message: {msgs[:1]}".replace("\n", " "))
        for f in infos:
            code, details = code_of(f)
            tally.add("GetModelInfo", code, {OK}, "", details)
            if code == OK and f.result().weight_version != 0:
                tally.fail("GetModelInfo", "", f"version moved to {f.result().weight_version}")

    run()
    same = version(policy) == 0 and greedy(policy.stub) == policy.baseline
    leftovers = staged_pushes(policy.staging)
    record(request, "Fuzz PolicyService.UpdateWeights (one-tensor pushes, one header/chunk/commit fault each)",
           cases=tally.cases("UpdateWeights"), faults=tally.cases("UpdateWeights"),
           errors=tally.summary("UpdateWeights"),
           lost=f"version {'unchanged' if same else 'MOVED'}, {len(leftovers)} staged file left (the spare)",
           result=tally.result())
    record(request, "Fuzz PolicyService.GetModelInfo (alongside the pushes)", cases=tally.cases("GetModelInfo"),
           errors=tally.summary("GetModelInfo"), lost=0, result="pass" if not tally.codes["GetModelInfo"].keys() - {"OK"} else "FAIL")
    assert same
    # A refused push's file is kept as the spare that the next push overwrites; one at most.
    assert len(leftovers) <= 1, f"refused pushes left staged files behind: {leftovers}"
    assert not tally.wrong, "\n".join(tally.wrong)


def _mangle(data: bytes):
    """Valid encodings with bytes flipped, cut or inserted: the decoder's hard cases."""
    return st.one_of(
        st.binary(max_size=256),
        st.tuples(st.integers(0, max(0, len(data) - 1)), st.integers(0, 255)).map(
            lambda t: data[:t[0]] + bytes([t[1]]) + data[t[0] + 1:]),
        st.integers(0, len(data)).map(lambda k: data[:k]),
        st.tuples(st.integers(0, len(data)), st.binary(min_size=1, max_size=16)).map(
            lambda t: data[:t[0]] + t[1] + data[t[0]:]),
    )


def test_fuzz_garbage_bytes(policy, request):
    """Bytes straight to the server's decoder: a message that does not parse is the caller's
    fault (INVALID_ARGUMENT), never UNKNOWN or INTERNAL."""
    tally = Tally()
    good = policy_pb2.GenerateRequest(prompts=[common_pb2.TextOrTokens(text="hello")],
                                      params=policy_pb2.SamplingParams(max_tokens=2, temperature=0.0)).SerializeToString()
    spec = _small_tensor(policy.info)
    header = policy_pb2.UpdateWeightsRequest(header=policy_pb2.WeightsHeader(version=1, tensors=[
        policy_pb2.TensorSpec(name=spec.name, dtype=spec.dtype, shape=list(spec.shape), nbytes=spec.nbytes)]))
    good_stream = policy_pb2.GenerateStreamRequest(prompt=common_pb2.TextOrTokens(text="hello"),
                                                   params=policy_pb2.SamplingParams(max_tokens=2)).SerializeToString()
    generate = raw_unary(policy.channel, POLICY, "Generate")
    info = raw_unary(policy.channel, POLICY, "GetModelInfo")
    stream = raw_unary_stream(policy.channel, POLICY, "GenerateStream")
    update = raw_stream_unary(policy.channel, POLICY, "UpdateWeights")

    def drain(b):
        try:
            list(stream(b, timeout=60))
            return OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""

    @settings(FUZZ, max_examples=120)
    @given(st.lists(_mangle(good), min_size=BATCH, max_size=BATCH), st.lists(_mangle(b""), min_size=4, max_size=4),
           st.lists(_mangle(good_stream), min_size=BATCH, max_size=BATCH),
           st.lists(st.lists(_mangle(header.SerializeToString()), min_size=1, max_size=3), min_size=4, max_size=4))
    def run(gen_bytes, info_bytes, stream_bytes, update_msgs):
        calls = [("Generate", generate.future(b, timeout=60)) for b in gen_bytes]
        calls += [("GetModelInfo", info.future(b, timeout=60)) for b in info_bytes]
        calls += [("UpdateWeights", update.future(iter(m), timeout=60)) for m in update_msgs]
        for rpc, f in calls:
            code, details = code_of(f)
            tally.add(rpc, code, None, "garbage", details)
        for code, details in policy.pool.map(drain, stream_bytes):
            tally.add("GenerateStream", code, None, "garbage", details)

    run()
    same = version(policy) == 0 and greedy(policy.stub) == policy.baseline
    record(request, "Garbage bytes to PolicyService decoders (all 4 RPCs)", cases=tally.cases(),
           errors="; ".join(f"{r}: {tally.summary(r)}" for r in sorted(tally.codes)),
           lost=0 if same else "fixed greedy answer changed", result=tally.result())
    assert same
    assert not tally.wrong, "\n".join(tally.wrong)


# ---- 2. interrupted weight pushes ------------------------------------------------------------

def requests(serialized) -> list[policy_pb2.UpdateWeightsRequest]:
    """weight_messages' serialized requests as messages, to corrupt and send with the stub."""
    return [policy_pb2.UpdateWeightsRequest.FromString(m) for m in serialized]


def _weights(model_dir, noise: float, seed: int = 0):
    import torch
    from safetensors.torch import load_file

    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    g = torch.Generator().manual_seed(seed)
    return {k: v + noise * v.float().std().nan_to_num(1.0) * torch.randn(v.shape, generator=g) if noise else v
            for k, v in state.items()}


def test_interrupted_weight_pushes(policy, request):
    """60 pushes of new weights, each cut or corrupted somewhere: the version never moves,
    greedy outputs stay identical, only the one spare staging file stays; then a good push applies."""
    rng = random.Random(1234)
    info = policy.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30)
    v0 = info.weight_version
    perturbed = _weights(policy.model_dir, noise=0.5)
    plan = plan_push(perturbed, info)
    good = requests(weight_messages(plan, v0 + 1, True, info.dtype, 64 << 10))
    assert len(good) >= 8
    kinds = ["client cancels mid-stream", "stream ends without commit", "flipped byte", "wrong checksum",
             "dropped chunk", "duplicated chunk", "truncated chunk", "deadline mid-stream"]
    outcomes: dict[str, int] = {}
    for i in range(64):
        kind = kinds[i % len(kinds)]
        msgs = [m.__deepcopy__() for m in good]
        k = rng.randrange(1, len(msgs) - 1)  # a chunk position
        expected = {IA}
        if kind == "stream ends without commit":
            msgs = msgs[:rng.randrange(1, len(msgs) - 1)]
        elif kind == "flipped byte":
            data = bytearray(msgs[k].chunk.data)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            msgs[k].chunk.data = bytes(data)
        elif kind == "wrong checksum":
            msgs[-1].commit.digest = bytes(rng.randrange(256) for _ in range(16))
        elif kind == "dropped chunk":
            del msgs[k]
        elif kind == "duplicated chunk":
            msgs.insert(k, msgs[k])
        elif kind == "truncated chunk":
            msgs[k].chunk.data = msgs[k].chunk.data[:rng.randrange(len(msgs[k].chunk.data))]

        if kind in ("client cancels mid-stream", "deadline mid-stream"):
            sent, release = threading.Event(), threading.Event()
            cut = rng.randrange(1, len(msgs) - 1)

            def gen(cut=cut, msgs=msgs, sent=sent, release=release):
                yield from msgs[:cut]
                sent.set()
                release.wait(30)  # hold the stream open, commit never sent

            if kind == "deadline mid-stream":
                f = policy.stub.UpdateWeights.future(gen(), timeout=rng.uniform(0.5, 1.5))
                expected = {grpc.StatusCode.DEADLINE_EXCEEDED}
                code, details = code_of(f)
            else:
                f = policy.stub.UpdateWeights.future(gen(), timeout=60)
                assert sent.wait(30)
                time.sleep(rng.uniform(0, 0.2))
                f.cancel()
                expected = {grpc.StatusCode.CANCELLED}
                code = grpc.StatusCode.CANCELLED if f.cancelled() else code_of(f)[0]
                details = ""
            release.set()
        else:
            try:
                policy.stub.UpdateWeights(iter(msgs), timeout=60)
                code, details = OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
        assert code in expected, f"push {i} ({kind}): got {code.name} ({details})"
        outcomes[kind] = outcomes.get(kind, 0) + 1
        assert version(policy) == v0, f"push {i} ({kind}) moved the version"
        assert greedy(policy.stub) == policy.baseline, f"push {i} ({kind}) changed greedy outputs"
    time.sleep(1)  # a cancelled handler discards its stage as it unwinds
    spare = staged_pushes(policy.staging)
    assert len(spare) <= 1, f"refused pushes left more than the one spare staging file: {spare}"

    # The next good push applies, moves the version and changes the model; pushing the
    # original weights back restores the exact greedy outputs.
    reply = policy.stub.UpdateWeights(iter(good), timeout=120)
    assert (reply.version, reply.previous_version) == (v0 + 1, v0) and version(policy) == v0 + 1
    assert greedy(policy.stub) != policy.baseline, "the perturbed weights did not change greedy outputs"
    original = requests(weight_messages(plan_push(_weights(policy.model_dir, 0.0), info), v0 + 2, True, info.dtype,
                                        64 << 10))
    assert policy.stub.UpdateWeights(iter(original), timeout=120).version == v0 + 2
    assert greedy(policy.stub) == policy.baseline, "pushing the original weights back did not restore the outputs"
    # The push now served, and at most the spare: the first good push overwrote the old one.
    assert len(staged_pushes(policy.staging)) <= 2 and set(spare) <= set(staged_pushes(policy.staging))
    record(request, "Interrupted/corrupted weight pushes (full model, 64 KiB chunks)", cases=66,
           faults=f"{sum(outcomes.values())}: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()),
           errors="0 (each refused with its code)",
           lost="0: version stayed, greedy identical after each, 1 spare staging file at most; next good push applied",
           result="pass")


# ---- 3. load ---------------------------------------------------------------------------------

def test_load_64_clients_60s(policy, request):
    bench = load_bench()
    import asyncio

    before = greedy(policy.stub)
    r = asyncio.run(bench.run_load(policy.server.address, "policy", clients=64, duration=60, config=AUTH,
                                   pid=policy.server.pid, warmup=10, max_tokens=8, timeout=60))
    time.sleep(2)
    after_rss = tree_rss(policy.server.pid)
    growth = max(r["rss_max_after_warmup"], after_rss) / r["rss_warm"] - 1
    record(request, "Load: PolicyService.Generate, 64 clients x 60 s (8 greedy tokens each)",
           cases=r["requests"], load=f"64 clients, {r['duration_s']} s, {r['rps']} req/s, p50 {r['p50_ms']} ms, "
                                     f"p99 {r['p99_ms']} ms",
           errors=r["errors"], memory=f"before {mib(r['rss_before'])}, after warm-up {mib(r['rss_warm'])}, "
                                      f"max {mib(r['rss_max_after_warmup'])}, after {mib(after_rss)} "
                                      f"({growth:+.1%})",
           lost=0, result="pass" if r["errors"] == 0 and growth <= 0.10 else "FAIL")
    assert r["errors"] == 0, r["codes"]
    assert growth <= 0.10, r
    assert greedy(policy.stub) == before and health_status(policy.server.address, POLICY, AUTH) == 1


def test_overload_is_fast_resource_exhausted(policy, request):
    """Twice the --max-concurrent-rpcs limit: the excess is refused at once (well inside the
    30 s deadline: the latency includes the 2-core client's own scheduling), nothing times
    out, and the server answers normally afterwards."""
    bench = load_bench()
    import asyncio

    before = greedy(policy.stub)
    r = asyncio.run(bench.run_load(policy.server.address, "policy", clients=2 * MAX_RPCS, duration=15, config=AUTH,
                                   max_tokens=32, timeout=30))
    refused = r["codes"].get("RESOURCE_EXHAUSTED", 0)
    record(request, f"Overload: PolicyService, {2 * MAX_RPCS} clients vs --max-concurrent-rpcs {MAX_RPCS}, 15 s",
           cases=r["requests"], load=f"{2 * MAX_RPCS} clients; OK p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms",
           errors=f"codes {r['codes']}; RESOURCE_EXHAUSTED p50 {r['p50_ms_by_code'].get('RESOURCE_EXHAUSTED')} ms "
                  f"p99 {r['p99_ms_by_code'].get('RESOURCE_EXHAUSTED')} ms (deadline 30 s)",
           lost=0, result="pass" if set(r["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"} and refused else "FAIL")
    assert set(r["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, r
    assert refused > 0 and r["ok"] > 0
    assert r["p50_ms_by_code"]["RESOURCE_EXHAUSTED"] < r["p50_ms"], r  # refusing is quicker than serving
    assert r["p99_ms_by_code"]["RESOURCE_EXHAUSTED"] < FAST_REFUSAL_MS, r
    assert greedy(policy.stub) == before


# ---- 1b. TrainerService: a short `rlhf train ppo` against this policy server ----------------

@pytest.fixture(scope="module")
def trainer(policy, tiny_policy_dir, tiny_reward_dir, reliability_logs, tmp_path_factory):
    """A PPO run (tiny batches, many steps) with its TrainerService, against this module's
    policy server and a reward server of its own; paused once it has finished a step."""
    import yaml

    from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
    from services.demo.launch import ChildServer, free_port, rlhf_command
    from services.demo.data import write_demo_data
    from reliability_common import TRAINER, reward_server, server_env

    root = tmp_path_factory.mktemp("trainer")
    data = write_demo_data(root / "data", seed=0, num_sft=8, num_prefs=8, num_prompts=64)
    with reward_server(tiny_reward_dir, reliability_logs, env={"RLHF_AUTH_TOKEN": TOKEN}, client_config=AUTH) as rm:
        config = root / "ppo.yaml"
        config.write_text(yaml.safe_dump(dict(
            policy_addresses=[policy.server.address], reward_address=rm.address, sft_model=str(tiny_policy_dir),
            reward_model=str(tiny_reward_dir), prompts=str(data["prompts"]), out=str(root / "run"), steps=10_000,
            seed=0, checkpoint_every=0, rollout=dict(batch_size=4, max_tokens=8),
            ppo=dict(epochs=1, minibatch_size=4, lr=1e-5), services=dict(dependency_deadline_s=120, retry_max_s=2.0))))
        port = free_port()
        with ChildServer(rlhf_command("train", "ppo", "--config", str(config), "--host", "127.0.0.1", "--port",
                                      str(port), "--metrics-port", "0", "--grace-seconds", "5"),
                         port=port, service=TRAINER, env=server_env(RLHF_AUTH_TOKEN=TOKEN),
                         log_path=reliability_logs / "trainer.log", client_config=AUTH) as proc:
            channel = create_channel(proc.address, AUTH)
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            deadline = time.monotonic() + 300
            while stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=30).step < 1:
                assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
                time.sleep(0.5)
            stub.Pause(trainer_pb2.PauseRequest(), timeout=30)
            while (status := stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=30)).phase != trainer_pb2.PHASE_PAUSED:
                assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
                time.sleep(0.2)
            yield types.SimpleNamespace(proc=proc, channel=channel, stub=stub, pb=trainer_pb2, pb_grpc=trainer_pb2_grpc,
                                        paused_at=status.step, out=root / "run")
            channel.close()


def test_fuzz_trainer_service(trainer, request):
    """Every TrainerService RPC with its (empty) request, unknown fields and garbage bytes,
    while the run is paused; Pause/Resume in random orders must leave the state of the last
    one; SaveCheckpoint writes at the paused step; afterwards the run goes on."""
    from reliability_common import TRAINER, raw_unary_stream

    pb, stub, tally = trainer.pb, trainer.stub, Tally()
    raws = {m: raw_unary(trainer.channel, TRAINER, m) for m in ("GetStatus", "Pause", "Resume", "SaveCheckpoint")}
    watch_raw = raw_unary_stream(trainer.channel, TRAINER, "WatchMetrics")
    kinds = {"GetStatus": pb.GetStatusRequest, "Pause": pb.PauseRequest, "Resume": pb.ResumeRequest,
             "SaveCheckpoint": pb.SaveCheckpointRequest, "WatchMetrics": pb.WatchMetricsRequest}

    def decodes(kind, b: bytes) -> bool:
        try:
            kinds[kind].FromString(b)
            return True
        except Exception:  # noqa: BLE001
            return False

    def watch(b: bytes):
        """A decodable WatchMetrics stays open while paused: read what it sends for 0.15 s.
        Garbage must be refused, however long the busy server takes to say so."""
        call = watch_raw(b, timeout=0.15 if decodes("WatchMetrics", b) else 30)
        try:
            msgs = list(call)
            return OK, "", msgs
        except grpc.RpcError as e:
            return e.code(), e.details() or "", []

    garbage = st.one_of(st.binary(max_size=64), st.binary(max_size=8).map(lambda b: b"\x08\x01" + b),
                        st.just(b"\x08\x01"), st.just(b"\xfa\x01\x00"))
    # A SaveCheckpoint that parses writes a real checkpoint (~0.5 s); those are few on purpose.
    unary_case = st.one_of(
        st.tuples(st.sampled_from(["GetStatus", "Pause", "Resume"]), garbage),
        st.tuples(st.just("SaveCheckpoint"), st.binary(max_size=64).filter(lambda b: not decodes("SaveCheckpoint", b))))

    @settings(FUZZ, max_examples=50)
    # 50 examples x (160 unary + 40 WatchMetrics) cases: about 2,000 per RPC.
    @given(st.lists(unary_case, min_size=160, max_size=160), st.lists(garbage, min_size=40, max_size=40),
           st.lists(st.sampled_from(["Pause", "Resume"]), min_size=1, max_size=6),
           st.integers(0, 9))
    def run(unary, watches, sequence, extra_checkpoint):
        if extra_checkpoint == 0:  # one example in ten: a SaveCheckpoint with unknown fields
            unary = unary + [("SaveCheckpoint", b"\xfa\x01\x00")]
        # Garbage to the four unary RPCs, concurrently. A decodable Resume resumes the run
        # for real; the Pause at the end brings it back.
        futures = [(m, b, raws[m].future(b, timeout=60)) for m, b in unary]
        for m, b, f in futures:
            code, details = code_of(f)
            want = {OK} if decodes(m, b) else {IA}
            tally.add(m, code, want, "garbage" if want == {IA} else "decodable bytes", details)
        for b, (code, details, msgs) in zip(watches, trainer_pool.map(watch, watches)):
            want = {grpc.StatusCode.DEADLINE_EXCEEDED} if decodes("WatchMetrics", b) else {IA}
            tally.codes["WatchMetrics"][code.name] += 1
            if code not in want:
                tally.fail("WatchMetrics", "garbage", f"got {code.name} ({details}), want {sorted(c.name for c in want)}")
        # Pause/Resume in a random order: the last one wins.
        for op in sequence:
            reply = getattr(stub, op)(kinds[op](), timeout=30)
            tally.codes[op]["OK"] += 1
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=30)
        tally.codes["GetStatus"]["OK"] += 1
        if status.paused != (sequence[-1] == "Pause") or reply.paused != status.paused:
            tally.fail("Pause/Resume", "sequence", f"{sequence} left paused={status.paused}")
        stub.Pause(pb.PauseRequest(), timeout=30)
        tally.codes["Pause"]["OK"] += 1

    import concurrent.futures as cf
    trainer_pool = cf.ThreadPoolExecutor(8)
    try:
        run()
    finally:
        trainer_pool.shutdown()

    # Paused again: a checkpoint comes at the step the run stands at, history is complete.
    deadline = time.monotonic() + 120
    while (status := stub.GetStatus(pb.GetStatusRequest(), timeout=30)).phase != pb.PHASE_PAUSED:
        assert time.monotonic() < deadline and trainer.proc.alive(), trainer.proc.log_tail()
        time.sleep(0.2)
    saved = [stub.SaveCheckpoint.future(pb.SaveCheckpointRequest(), timeout=120) for _ in range(3)]
    for f in saved:
        reply = f.result()
        tally.codes["SaveCheckpoint"]["OK"] += 1
        assert reply.step == status.step and __import__("pathlib").Path(reply.path).is_dir(), reply
    history = stub.WatchMetrics(pb.WatchMetricsRequest(include_history=True), timeout=3)
    steps = []
    with pytest.raises(grpc.RpcError) as err:
        for m in history:
            steps.append(m.step)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and steps == list(range(1, status.step + 1))
    # Resumed, the run makes progress: the next step arrives on WatchMetrics.
    stub.Resume(pb.ResumeRequest(), timeout=30)
    nxt = next(iter(stub.WatchMetrics(pb.WatchMetricsRequest(), timeout=300)))
    assert nxt.step == status.step + 1 and trainer.proc.alive()
    assert stub.GetStatus(pb.GetStatusRequest(), timeout=30).step >= nxt.step
    for rpc in ("GetStatus", "Pause", "Resume", "SaveCheckpoint", "WatchMetrics"):
        record(request, f"Fuzz TrainerService.{rpc} (empty request, unknown fields, garbage; paused run)",
               cases=tally.cases(rpc), errors=tally.summary(rpc),
               lost=0, result=tally.result() if rpc != "GetStatus" else tally.result())
    assert not tally.wrong, "\n".join(tally.wrong)


def test_trainer_rpcs_need_the_token(trainer, request):
    pb = trainer.pb
    paused = trainer.stub.GetStatus(pb.GetStatusRequest(), timeout=30).paused  # as the tests before left it
    refused = 0
    for token in BAD_TOKENS:
        with create_channel(trainer.proc.address, ClientConfig(auth_token=token)) as channel:
            stub = trainer.pb_grpc.TrainerServiceStub(channel)
            for name, call in {
                "GetStatus": lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=30),
                "Pause": lambda: stub.Pause(pb.PauseRequest(), timeout=30),
                "Resume": lambda: stub.Resume(pb.ResumeRequest(), timeout=30),
                "SaveCheckpoint": lambda: stub.SaveCheckpoint(pb.SaveCheckpointRequest(), timeout=30),
                "WatchMetrics": lambda: next(iter(stub.WatchMetrics(pb.WatchMetricsRequest(include_history=True),
                                                                    timeout=30))),
            }.items():
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (token, name, err.value)
                refused += 1
    status = trainer.stub.GetStatus(pb.GetStatusRequest(), timeout=30)
    assert status.paused == paused  # no anonymous Pause or Resume got through
    record(request, "Auth: TrainerService, 5 RPCs x 7 missing/wrong tokens", cases=refused,
           errors=f"{refused} UNAUTHENTICATED", result="pass")
    # Done with the run: SIGTERM finishes the step, checkpoints and exits (before the
    # policy server it depends on goes away at the end of the module).
    # (Earlier tests of the module asked for checkpoints: only the one written after SIGTERM counts.)
    before = {p.name: p.stat().st_mtime_ns for p in (trainer.out / "checkpoints").glob("step-*")}
    t0 = time.monotonic()
    code = trainer.proc.terminate(timeout=120)
    took = time.monotonic() - t0
    steps = [json.loads(line)["step"] for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    latest = (trainer.out / "checkpoints" / "LATEST").read_text().strip()
    fresh = latest not in before or (trainer.out / "checkpoints" / latest).stat().st_mtime_ns != before[latest]
    ok = code == 128 + signal.SIGTERM and latest == f"step-{steps[-1]:06d}" and fresh
    record(request, "SIGTERM to the trainer mid-run (finish the step, checkpoint, exit)", cases=1, faults=1,
           errors=f"exit code {code} after {took:.1f} s", lost=f"LATEST {latest} after step {steps[-1]}",
           result="pass" if ok else "FAIL")
    # 143: stopped before its last step, as a Kubernetes Job must see it (not a success, resumable).
    assert code == 128 + signal.SIGTERM, f"exit {code} (None: it had to be killed)"
    assert latest == f"step-{steps[-1]:06d}" and fresh, (latest, steps[-1], before)


# ---- 5. auth -------------------------------------------------------------------------------

def test_every_rpc_needs_the_token(policy, request):
    """Missing and wrong tokens on every PolicyService RPC: UNAUTHENTICATED, and the push
    they carried (version 10**6) is not applied."""
    info = policy.info
    push = requests(weight_messages(plan_push(_weights(policy.model_dir, 0.0), info), 10**6, True, info.dtype, 1 << 20))
    refused = 0
    for token in BAD_TOKENS:
        with create_channel(policy.server.address, ClientConfig(auth_token=token)) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            calls = {
                "Generate": lambda: stub.Generate(policy_pb2.GenerateRequest(
                    prompts=[common_pb2.TextOrTokens(text="hi")]), timeout=30),
                "GenerateStream": lambda: list(stub.GenerateStream(policy_pb2.GenerateStreamRequest(
                    prompt=common_pb2.TextOrTokens(text="hi")), timeout=30)),
                "UpdateWeights": lambda: stub.UpdateWeights(iter(push), timeout=30),
                "GetModelInfo": lambda: stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (token, name, err.value)
                refused += 1
    assert version(policy) < 10**6
    record(request, f"Auth: PolicyService, 4 RPCs x {len(BAD_TOKENS)} missing/wrong tokens", cases=refused,
           errors=f"{refused} UNAUTHENTICATED", lost="0 (no push applied)", result="pass")


# ---- 6. a full staging disk, a dead engine, a crash (servers of their own) --------------------

TMPFS_BYTES = 1 << 20  # less than one full push of the tiny model, more than a small partial one


def _mount_tmpfs(path, size: int) -> bool:
    """A small tmpfs: a real disk that fills up. Needs root (CAP_SYS_ADMIN)."""
    import subprocess

    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _engine_core(pid: int):
    """vLLM's engine-core child of a policy server (process title VLLM::EngineCore)."""
    import psutil

    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name():
                return p
        except psutil.NoSuchProcess:
            pass
    raise AssertionError(f"no EngineCore process under pid {pid}")


@pytest.fixture(scope="module")
def doomed(tiny_policy_dir, reliability_logs, tmp_path_factory):
    """A policy server staging on a 1 MiB tmpfs (when this machine lets us mount one); the
    dead-engine test kills its engine core."""
    import subprocess

    staging = tmp_path_factory.mktemp("small-disk")
    mounted = _mount_tmpfs(staging, TMPFS_BYTES)
    server = policy_server(tiny_policy_dir, reliability_logs, "--staging-dir", str(staging), "--grace-seconds", "30",
                           env={"RLHF_AUTH_TOKEN": TOKEN}, client_config=AUTH)
    try:
        with server:
            channel = create_channel(server.address, AUTH)
            yield types.SimpleNamespace(server=server, channel=channel, staging=staging, mounted=mounted,
                                        stub=policy_pb2_grpc.PolicyServiceStub(channel), model_dir=tiny_policy_dir)
            channel.close()
    finally:
        if mounted:
            subprocess.run(["umount", str(staging)], check=False)


def test_a_full_staging_disk_is_resource_exhausted(doomed, request):
    if not doomed.mounted:
        pytest.skip("mounting a small tmpfs needs root here; tests/unit/test_policy_weights.py covers the mapping")
    import shutil

    stub = doomed.stub
    info = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30)
    assert sum(t.nbytes for t in info.tensors) > TMPFS_BYTES
    before = greedy(stub)
    full = requests(weight_messages(plan_push(_weights(doomed.model_dir, 0.5), info), 1, True, info.dtype, 64 << 10))
    answers = []
    for _ in range(3):
        try:
            stub.UpdateWeights(iter(full), timeout=60)
            answers.append((OK, ""))
        except grpc.RpcError as e:
            answers.append((e.code(), e.details() or ""))
    assert all(code == RE and "is full" in details and "--staging-dir" in details for code, details in answers), answers
    assert version(doomed) == 0 and greedy(stub) == before
    assert not staged_pushes(doomed.staging), "the partial file of a refused push must not fill the disk"
    free = shutil.disk_usage(doomed.staging).free
    # A push that fits still goes through: the server kept serving and kept its disk clean.
    small = _small_tensor(info)
    partial = requests(weight_messages(plan_push({small.name: _weights(doomed.model_dir, 0.5)[small.name]}, info), 1,
                                       False, info.dtype, 64 << 10))
    assert stub.UpdateWeights(iter(partial), timeout=60).version == 1 and version(doomed) == 1
    record(request, "Full staging disk: 1 MiB tmpfs, full pushes of the 2 MiB model", cases=len(answers) + 1,
           faults=f"{len(answers)} pushes larger than the disk",
           errors=f"{len(answers)} RESOURCE_EXHAUSTED ('{answers[0][1][:60]}...')",
           lost=f"0: version and greedy unchanged, partial files deleted ({free >> 10} KiB free); a push that fits "
                f"applied", result="pass")


def test_a_dead_engine_turns_not_serving_and_exits(doomed, request):
    """kill -9 of vLLM's engine core (what the OOM killer does): health turns NOT_SERVING,
    calls get UNAVAILABLE (never INTERNAL; CANCELLED at most for the few that race the final
    stop), and the process exits non-zero at once so that Kubernetes restarts it."""
    import os
    import signal

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = doomed.server
    core = _engine_core(server.pid)
    events: list[tuple[float, int]] = []
    watch = health_pb2_grpc.HealthStub(doomed.channel).Watch(health_pb2.HealthCheckRequest(service=POLICY))

    def follow():
        try:
            for reply in watch:
                events.append((time.monotonic(), reply.status))
        except grpc.RpcError:
            pass

    codes: dict[str, int] = {}
    stop = threading.Event()

    def load():
        while not stop.is_set():
            code = OK
            try:
                greedy(doomed.stub)
            except grpc.RpcError as e:
                code = e.code()
            codes[code.name] = codes.get(code.name, 0) + 1

    threads = [threading.Thread(target=follow, daemon=True)] + [threading.Thread(target=load, daemon=True)
                                                                 for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t_kill = time.monotonic()
    os.kill(core.pid, signal.SIGKILL)
    try:
        exit_code = server.proc.wait(timeout=60)
    finally:
        stop.set()
    exited = time.monotonic() - t_kill
    not_serving = next((t - t_kill for t, status in events if t > t_kill
                        and status == health_pb2.HealthCheckResponse.NOT_SERVING), None)
    for t in threads[1:]:
        t.join(30)
    left = staged_pushes(doomed.staging)
    record(request, "kill -9 of the vLLM engine core under load (4 clients)", cases=sum(codes.values()), faults=1,
           load="4 clients of greedy Generate", errors=f"codes {codes}",
           lost=f"NOT_SERVING {'never seen' if not_serving is None else f'{not_serving:.2f} s'} after the kill; "
                f"exit {exit_code} {exited:.1f} s after; staging files left {len(left)}",
           result="pass" if exit_code not in (0, None) and not_serving is not None and exited < 10
           and set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"} else "FAIL")
    assert not_serving is not None and not_serving < 5.0, events
    assert exit_code not in (0, None) and exited < 10, (exit_code, exited)
    # CANCELLED: a call racing the final stop (grpc/grpc#41785, see the SIGTERM section of
    # docs/reliability.md); never INTERNAL or UNKNOWN
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"} and codes.get("UNAVAILABLE"), codes
    assert not left  # it still stopped through the runtime: its staging files went with it


def test_a_killed_servers_staging_files_go_at_restart(tiny_policy_dir, reliability_logs, tmp_path_factory, request):
    """Two servers share a staging directory; one is SIGKILLed with a served push and a
    spare in it. Restarted, it removes its dead predecessor's files and leaves those of the
    other, live server alone (which still serves its pushed weights)."""
    import uuid

    staging = tmp_path_factory.mktemp("shared-staging")
    args = ("--staging-dir", str(staging))
    servers = [policy_server(tiny_policy_dir, reliability_logs, *args, env={"RLHF_AUTH_TOKEN": TOKEN},
                             client_config=AUTH) for _ in range(2)]
    restarted = None
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        owners, outputs = [], []
        for i, s in enumerate(servers):
            with create_channel(s.address, AUTH) as channel:
                stub = policy_pb2_grpc.PolicyServiceStub(channel)
                info = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30)
                owners.append(uuid.UUID(info.instance_id).hex)
                msgs = requests(weight_messages(plan_push(_weights(tiny_policy_dir, 0.5, seed=i), info), 1, True,
                                                info.dtype, 64 << 10))
                assert stub.UpdateWeights(iter(msgs), timeout=120).version == 1  # the served push file
                code, _ = code_of_push(stub, msgs[:-1] + [policy_pb2.UpdateWeightsRequest(
                    commit=policy_pb2.WeightsCommit(digest=b"\0" * 16))], version=2)
                assert code == IA  # a refused push: its file stays as the spare
                outputs.append(greedy(stub))
        files = {o: [f for f in staged_pushes(staging) if o in f] for o in owners}
        assert all(len(f) == 2 for f in files.values()), files
        servers[0].kill()  # SIGKILL, like the OOM killer: no cleanup
        assert [f for f in staged_pushes(staging) if owners[0] in f] == files[owners[0]]
        restarted = policy_server(tiny_policy_dir, reliability_logs, *args, env={"RLHF_AUTH_TOKEN": TOKEN},
                                  client_config=AUTH).start().wait_ready()
        left = staged_pushes(staging)
        assert not [f for f in left if owners[0] in f], left
        assert [f for f in left if owners[1] in f] == files[owners[1]], left
        with create_channel(servers[1].address, AUTH) as channel:
            assert greedy(policy_pb2_grpc.PolicyServiceStub(channel)) == outputs[1]  # still its pushed weights
        codes = [restarted.terminate(), servers[1].terminate()]
        remaining = sorted(p.name for p in staging.iterdir())
        record(request, "SIGKILL of a policy server sharing its staging dir, then a restart", cases=3, faults=1,
               errors=f"clean stops exit {codes}",
               lost=f"killed server's {len(files[owners[0]])} files removed at restart; the live server's "
                    f"{len(files[owners[1]])} kept; {len(remaining)} files left after clean stops",
               result="pass" if codes == [0, 0] and not remaining else "FAIL")
        assert codes == [0, 0] and not remaining, (codes, remaining)
    finally:
        for s in servers + [restarted]:
            if s is not None:
                s.terminate()


def code_of_push(stub, msgs, version: int):
    msgs = [m.__deepcopy__() for m in msgs]
    msgs[0].header.version = version
    try:
        stub.UpdateWeights(iter(msgs), timeout=60)
        return OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


# ---- 4. shutdown under load (last: it stops the module's server) ------------------------------

def test_sigterm_under_load_drains(policy, request):
    from shutdown_check import assert_drained, sigterm_under_load

    row, failed = sigterm_under_load(policy.server, POLICY, AUTH, "policy", grace=GRACE, clients=32)
    record(request, "SIGTERM under load: PolicyService, 32 clients", **row)
    assert_drained(row, failed)
