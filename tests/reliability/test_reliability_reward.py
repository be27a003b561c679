"""RewardService under fuzzing, garbage bytes, load, overload and SIGTERM, against real
`rlhf serve reward` processes (tiny model): one shared server for fuzzing and load (auth
on, the OpenRLHF HTTP endpoint on), small cheap ones for the limits and the drain."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import threading
import time
import types
import urllib.error
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.demo.launch import free_port, health_status

from reliability_common import (REWARD, Tally, code_of, load_bench, mib, raw_stream_stream, raw_unary, record,
                                reward_server, tree_rss)

pytestmark = pytest.mark.slow

TOKEN = "reward-reliability-token"
AUTH = ClientConfig(auth_token=TOKEN)
MAX_PAIRS, MAX_TEXT_BYTES = 32, 2048
BATCH = 16
FUZZ = settings(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])
OK, IA, RE, FP = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.FAILED_PRECONDITION)
FIXED = reward_pb2.ScoreRequest(pairs=[
    reward_pb2.ScorePair(prompt=common_pb2.TextOrTokens(text=p), response=common_pb2.TextOrTokens(text=r))
    for p, r in [("How do I prepare for my calculus exam?", "Review, then practice old exams."),
                 ("What is 17 times 23?", "391."), ("Write a haiku about the sea.", "Waves fold into foam.")]])


def fixed_scores(stub) -> list[float]:
    return [r.raw_score for r in stub.Score(FIXED, timeout=60).results]


@pytest.fixture(scope="module")
def reward(tiny_reward_dir, reliability_logs):
    http_port = free_port()
    server = reward_server(tiny_reward_dir, reliability_logs, "--max-pairs", str(MAX_PAIRS), "--max-text-bytes",
                           str(MAX_TEXT_BYTES), "--http-port", str(http_port),
                           env={"RLHF_AUTH_TOKEN": TOKEN}, client_config=AUTH)
    with server:
        vocab = json.loads((tiny_reward_dir / "config.json").read_text())["vocab_size"]
        channel = create_channel(server.address, AUTH)
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        info = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30)
        pool = concurrent.futures.ThreadPoolExecutor(BATCH)
        yield types.SimpleNamespace(server=server, channel=channel, stub=stub, info=info, vocab=vocab, pool=pool,
                                    http_port=http_port, baseline=fixed_scores(stub), model_dir=tiny_reward_dir)
        pool.shutdown(cancel_futures=True)
        channel.close()


# ---- strategies ------------------------------------------------------------------------------

CHARS = st.characters(exclude_categories=("Cs",))
TEXT = st.text(alphabet=CHARS, min_size=1, max_size=40)


def valid_input(vocab: int):
    return st.one_of(TEXT.map(lambda t: common_pb2.TextOrTokens(text=t)),
                     st.lists(st.integers(0, vocab - 1), min_size=1, max_size=32).map(
                         lambda ids: common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=ids))))


def bad_input(vocab: int, max_length: int):
    """(input, what) that must be INVALID_ARGUMENT wherever it appears."""
    ids = lambda xs: common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=xs))  # noqa: E731
    return st.one_of(
        st.just((common_pb2.TextOrTokens(), "input unset")),
        st.just((common_pb2.TextOrTokens(text=""), "empty text")),
        st.just((ids([]), "empty token_ids")),
        st.text(alphabet=CHARS, min_size=MAX_TEXT_BYTES // 4 + 1, max_size=MAX_TEXT_BYTES + 64)
        .filter(lambda t: len(t.encode()) > MAX_TEXT_BYTES).map(lambda t: (common_pb2.TextOrTokens(text=t), "text too long")),
        st.tuples(st.lists(st.integers(0, vocab - 1), max_size=8),
                  st.one_of(st.integers(-2**31, -1), st.integers(vocab, 2**31 - 1)))
        .map(lambda t: (ids(t[0] + [t[1]] + t[0]), "token id out of range")),
        st.integers(max_length + 1, max_length + 64).map(lambda n: (ids([5] * n), "token_ids over max length")),
    )


BAD_TRUNCATION = st.one_of(st.integers(3, 2**31 - 1), st.integers(-2**31, -1))
LONG_REQUEST_ID = st.text(alphabet=CHARS, min_size=33, max_size=200).filter(lambda s: len(s.encode()) > 128)


@st.composite
def score_case(draw, vocab: int, max_length: int):
    """(ScoreRequest, expected code, what): valid, or exactly one fault."""
    pairs = draw(st.lists(st.tuples(valid_input(vocab), valid_input(vocab)), min_size=1, max_size=6))
    r = reward_pb2.ScoreRequest(pairs=[reward_pb2.ScorePair(prompt=p, response=q) for p, q in pairs],
                                truncation=draw(st.sampled_from([0, 1, 2])), normalize=draw(st.booleans()),
                                request_id=draw(st.text(alphabet=CHARS, max_size=20)))
    fault = draw(st.sampled_from(["valid"] * 5 + ["no pairs", "too many pairs", "bad prompt", "bad response",
                                                  "bad truncation", "request_id too long", "long pair rejected",
                                                  "long pair kept", "long response"]))
    i = draw(st.integers(0, len(r.pairs) - 1))
    long_ids = lambda n: common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=[9] * n))  # noqa: E731
    if fault == "valid":
        return r, OK, fault
    if fault == "no pairs":
        del r.pairs[:]
    elif fault == "too many pairs":
        r.pairs.extend([r.pairs[0]] * (MAX_PAIRS + draw(st.integers(0, 8))))
    elif fault in ("bad prompt", "bad response"):
        x, what = draw(bad_input(vocab, max_length))
        getattr(r.pairs[i], fault.split()[1]).CopyFrom(x)
        fault = f"{fault}: {what}"
    elif fault == "bad truncation":
        r.truncation = draw(BAD_TRUNCATION)
    elif fault == "request_id too long":
        r.request_id = draw(LONG_REQUEST_ID)
    elif fault in ("long pair rejected", "long pair kept"):
        # prompt fits alone, prompt + response + EOS does not
        r.pairs[i].prompt.CopyFrom(long_ids(draw(st.integers(max_length - 20, max_length))))
        r.pairs[i].response.CopyFrom(long_ids(draw(st.integers(21, 40))))
        if fault == "long pair kept":
            r.truncation = reward_pb2.TRUNCATION_KEEP_END_OF_PROMPT
            return r, OK, fault
        r.truncation = draw(st.sampled_from([0, 1]))
    elif fault == "long response":
        r.pairs[i].response.CopyFrom(long_ids(max_length))
        r.truncation = reward_pb2.TRUNCATION_KEEP_END_OF_PROMPT
    return r, IA, fault


def check_score(r, reply, info) -> None:
    assert len(reply.results) == len(r.pairs)
    assert reply.request_id == r.request_id and reply.model_version == info.model_version
    for res in reply.results:
        assert math.isfinite(res.score) and math.isfinite(res.raw_score)
        assert 0 < res.num_tokens <= info.max_length
        if not r.normalize:
            assert res.score == res.raw_score
    if r.truncation != reward_pb2.TRUNCATION_KEEP_END_OF_PROMPT:
        assert not any(res.truncated for res in reply.results)


# ---- 1. fuzzing ------------------------------------------------------------------------------

def test_fuzz_score(reward, request):
    tally = Tally()

    @settings(FUZZ, max_examples=100)
    @given(st.lists(score_case(reward.vocab, reward.info.max_length), min_size=BATCH, max_size=BATCH))
    def run(cases):
        futures = [reward.stub.Score.future(r, timeout=60) for r, _, _ in cases]
        for (r, want, what), f in zip(cases, futures):
            code, details = code_of(f)
            tally.add("Score", code, {want}, what, details)
            if code == OK:
                tally.check("Score", what, check_score, r, f.result(), reward.info)
                if what == "long pair kept" and not any(x.truncated for x in f.result().results):
                    tally.fail("Score", what, "TRUNCATION_KEEP_END_OF_PROMPT did not say truncated")

    run()
    same = fixed_scores(reward.stub) == reward.baseline
    record(request, "Fuzz RewardService.Score (valid, or one fault each)", cases=tally.cases(),
           errors=tally.summary("Score"), lost=0 if same else "fixed answer changed", result=tally.result())
    assert same
    assert not tally.wrong, "\n".join(tally.wrong)


def test_fuzz_score_stream(reward, request):
    """Streams of 1-6 requests; a faulty one ends the stream with its code after the
    answers of the requests before it, in order."""
    tally = Tally()

    def consume(reqs):
        try:
            return OK, "", list(reward.stub.ScoreStream(iter(reqs), timeout=60))
        except grpc.RpcError as e:
            return e.code(), e.details() or "", []

    @settings(FUZZ, max_examples=60)
    @given(st.lists(st.lists(score_case(reward.vocab, reward.info.max_length), min_size=1, max_size=6),
                    min_size=BATCH // 2, max_size=BATCH // 2))
    def run(streams):
        outs = list(reward.pool.map(lambda s: consume([r for r, _, _ in s]), streams))
        for cases, (code, details, replies) in zip(streams, outs):
            first_bad = next((k for k, (_, want, _) in enumerate(cases) if want != OK), None)
            want = OK if first_bad is None else cases[first_bad][1]
            what = "all valid" if first_bad is None else cases[first_bad][2]
            tally.add("ScoreStream", code, {want}, what, details)
            if code == OK:
                if len(replies) != len(cases):
                    tally.fail("ScoreStream", what, f"{len(replies)} answers to {len(cases)} requests")
                for (r, _, _), reply in zip(cases, replies):
                    tally.check("ScoreStream", what, check_score, r, reply, reward.info)

    run()
    same = fixed_scores(reward.stub) == reward.baseline
    record(request, "Fuzz RewardService.ScoreStream (streams of 1-6 requests)", cases=tally.cases(),
           errors=tally.summary("ScoreStream"), lost=0 if same else "fixed answer changed", result=tally.result())
    assert same
    assert not tally.wrong, "\n".join(tally.wrong)


@st.composite
def compare_case(draw, vocab: int, max_length: int):
    fields = {k: draw(valid_input(vocab)) for k in ("prompt", "first", "second")}
    truncation = draw(st.sampled_from([0, 1, 2]))
    fault = draw(st.sampled_from(["valid"] * 4 + ["bad prompt", "bad first", "bad second", "bad truncation"]))
    want = OK
    if fault.startswith("bad ") and fault != "bad truncation":
        x, what = draw(bad_input(vocab, max_length))
        fields[fault.split()[1]] = x
        fault, want = f"{fault}: {what}", IA
    elif fault == "bad truncation":
        truncation, want = draw(BAD_TRUNCATION), IA
    return reward_pb2.CompareRequest(truncation=truncation, **fields), want, fault


def test_fuzz_compare_and_model_info(reward, request):
    tally = Tally()

    def check(reply):
        assert 0.0 <= reply.prob_first_preferred <= 1.0
        expect = 1 / (1 + math.exp(-(reply.first_score - reply.second_score)))
        assert abs(reply.prob_first_preferred - expect) < 1e-5, (reply, expect)
        assert reply.model_version == reward.info.model_version

    @settings(FUZZ, max_examples=100)
    @given(st.lists(compare_case(reward.vocab, reward.info.max_length), min_size=BATCH, max_size=BATCH))
    def run(cases):
        futures = [reward.stub.Compare.future(r, timeout=60) for r, _, _ in cases]
        infos = [reward.stub.GetModelInfo.future(common_pb2.GetModelInfoRequest(), timeout=60) for _ in range(4)]
        for (r, want, what), f in zip(cases, futures):
            code, details = code_of(f)
            tally.add("Compare", code, {want}, what, details)
            if code == OK:
                tally.check("Compare", what, check, f.result())
        for f in infos:
            code, details = code_of(f)
            tally.add("GetModelInfo", code, {OK}, "", details)
            if code == OK and f.result().model_version != reward.info.model_version:
                tally.fail("GetModelInfo", "", "model_version changed")

    run()
    same = fixed_scores(reward.stub) == reward.baseline
    record(request, "Fuzz RewardService.Compare (valid, or one fault each)", cases=tally.cases("Compare"),
           errors=tally.summary("Compare"), lost=0 if same else "fixed answer changed", result=tally.result())
    record(request, "Fuzz RewardService.GetModelInfo (alongside Compare)", cases=tally.cases("GetModelInfo"),
           errors=tally.summary("GetModelInfo"), lost=0,
           result="pass" if set(tally.codes["GetModelInfo"]) == {"OK"} else "FAIL")
    assert same
    assert not tally.wrong, "\n".join(tally.wrong)


def _mangle(data: bytes):
    return st.one_of(
        st.binary(max_size=256),
        st.tuples(st.integers(0, max(0, len(data) - 1)), st.integers(0, 255)).map(
            lambda t: data[:t[0]] + bytes([t[1]]) + data[t[0] + 1:]),
        st.integers(0, len(data)).map(lambda k: data[:k]),
        st.tuples(st.integers(0, len(data)), st.binary(min_size=1, max_size=16)).map(
            lambda t: data[:t[0]] + t[1] + data[t[0]:]),
    )


def test_fuzz_garbage_bytes(reward, request):
    """Bytes straight to the server's decoder: INVALID_ARGUMENT for what does not parse,
    never UNKNOWN or INTERNAL."""
    tally = Tally()
    score = FIXED.SerializeToString()
    compare = reward_pb2.CompareRequest(prompt=FIXED.pairs[0].prompt, first=FIXED.pairs[0].response,
                                        second=FIXED.pairs[1].response).SerializeToString()
    calls = {m: raw_unary(reward.channel, REWARD, m) for m in ("Score", "Compare", "GetModelInfo")}
    stream = raw_stream_stream(reward.channel, REWARD, "ScoreStream")

    def drain(msgs):
        try:
            list(stream(iter(msgs), timeout=60))
            return OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""

    @settings(FUZZ, max_examples=100)
    @given(st.lists(_mangle(score), min_size=8, max_size=8), st.lists(_mangle(compare), min_size=8, max_size=8),
           st.lists(_mangle(b""), min_size=4, max_size=4),
           st.lists(st.lists(_mangle(score), min_size=1, max_size=3), min_size=4, max_size=4))
    def run(score_bytes, compare_bytes, info_bytes, stream_msgs):
        futures = [("Score", calls["Score"].future(b, timeout=60)) for b in score_bytes]
        futures += [("Compare", calls["Compare"].future(b, timeout=60)) for b in compare_bytes]
        futures += [("GetModelInfo", calls["GetModelInfo"].future(b, timeout=60)) for b in info_bytes]
        for rpc, f in futures:
            code, details = code_of(f)
            tally.add(rpc, code, None, "garbage", details)
        for code, details in reward.pool.map(drain, stream_msgs):
            tally.add("ScoreStream", code, None, "garbage", details)

    run()
    same = fixed_scores(reward.stub) == reward.baseline
    record(request, "Garbage bytes to RewardService decoders (all 4 RPCs)", cases=tally.cases(),
           errors="; ".join(f"{r}: {tally.summary(r)}" for r in sorted(tally.codes)),
           lost=0 if same else "fixed answer changed", result=tally.result())
    assert same
    assert not tally.wrong, "\n".join(tally.wrong)


# ---- 5. security: tokens on every RPC, over gRPC and HTTP -------------------------------------

BAD_TOKENS = [None, "", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), " " + TOKEN]


def test_every_rpc_needs_the_token(reward, request):
    pair = FIXED.pairs[0]
    refused = 0
    for token in BAD_TOKENS:
        with create_channel(reward.server.address, ClientConfig(auth_token=token)) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            calls = {
                "Score": lambda: stub.Score(FIXED, timeout=30),
                "ScoreStream": lambda: list(stub.ScoreStream(iter([FIXED, FIXED]), timeout=30)),
                "Compare": lambda: stub.Compare(reward_pb2.CompareRequest(prompt=pair.prompt, first=pair.response,
                                                                          second=pair.response), timeout=30),
                "GetModelInfo": lambda: stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30),
                "LoadModel": lambda: stub.LoadModel(reward_pb2.LoadModelRequest(model_path="/"), timeout=30),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (token, name, err.value)
                refused += 1
    record(request, f"Auth: RewardService, 5 RPCs x {len(BAD_TOKENS)} missing/wrong tokens", cases=refused,
           errors=f"{refused} UNAUTHENTICATED", result="pass")


def _post(port: int, body, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = token
    req = urllib.request.Request(f"http://127.0.0.1:{port}/get_reward", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_http_get_reward_honours_the_token(reward, request):
    body = {"query": ["What is 17 times 23? 391."], "prompts": ["What is 17 times 23?"]}
    refused = 0
    for header in [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                   TOKEN, f"bearer {TOKEN}", f"Basic {TOKEN}"]:
        status, reply = _post(reward.http_port, body, header)
        assert status == 401 and "rewards" not in reply, (header, status, reply)
        refused += 1
    status, reply = _post(reward.http_port, body, f"Bearer {TOKEN}")
    assert status == 200 and len(reply["rewards"]) == 1, reply
    # Bad bodies with the right token: 400, never 500.
    bad = [{"query": "x"}, {"query": ["a"], "prompts": ["b", "c"]}, {"query": [], "prompts": []}, [1, 2],
           {"query": ["ab"], "prompts": ["a"], "truncation": "sideways"}]
    for b in bad:
        status, _ = _post(reward.http_port, b, f"Bearer {TOKEN}")
        assert status == 400, (b, status)
    record(request, "HTTP POST /get_reward (OpenRLHF) with auth on", cases=refused + 1 + len(bad),
           errors=f"{refused} wrong/missing tokens -> 401, {len(bad)} bad bodies -> 400, right token -> 200",
           result="pass")


# ---- 1b. fuzzing the HTTP endpoint -----------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=12)
LONE_SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
CHARSETS = ["", "; charset=utf-8", "; charset=latin-1", "; charset=bogus-42", "; charset="]


def _raw_post(port: int, data: bytes, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/get_reward", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read() or b"{}"
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"error": body[:200].decode(errors="replace")}


@st.composite
def http_case(draw):
    """(body bytes, Content-Type, expected status, what): a valid OpenRLHF body, or one mistake."""
    n = draw(st.integers(1, 4))
    prompts = [f"<|user|>{t}<|assistant|>" for t in draw(st.lists(TEXT, min_size=n, max_size=n))]
    body = {"query": [p + r for p, r in zip(prompts, draw(st.lists(TEXT, min_size=n, max_size=n)))],
            "labels": draw(st.lists(JSON, min_size=n, max_size=n))}
    if draw(st.booleans()):
        body["prompts"] = prompts
    if draw(st.booleans()):
        body["truncation"] = draw(st.sampled_from(["reject", "keep_end_of_prompt"]))
    if draw(st.booleans()):
        body["normalize"] = draw(st.booleans())
    fault = draw(st.sampled_from(["valid"] * 4 + ["query type", "prompts type", "prompts count", "truncation type",
                                                  "truncation value", "normalize type", "lone surrogate",
                                                  "deep nesting", "not an object", "not JSON", "not UTF-8",
                                                  "too many queries", "empty query"]))
    content_type = "application/json" + draw(st.sampled_from(CHARSETS))
    not_list_of_str = JSON.filter(lambda v: not (isinstance(v, list) and all(isinstance(x, str) for x in v)))
    if fault == "query type":
        body["query"] = draw(not_list_of_str)
    elif fault == "prompts type":
        body["prompts"] = draw(not_list_of_str.filter(lambda v: v is not None))
    elif fault == "prompts count":
        body["prompts"] = prompts + ["extra"]
    elif fault == "truncation type":
        body["truncation"] = draw(JSON.filter(lambda v: not isinstance(v, str)))
    elif fault == "truncation value":
        body["truncation"] = draw(TEXT.filter(lambda v: v not in ("reject", "keep_end_of_prompt")))
    elif fault == "normalize type":
        body["normalize"] = draw(JSON.filter(lambda v: not isinstance(v, bool)))
    elif fault == "lone surrogate":
        i = draw(st.integers(0, n - 1))
        body["query"][i] += draw(LONE_SURROGATE)  # json.dumps writes it as a \udXXX escape
    elif fault == "too many queries":
        body["query"] = body["query"] * (MAX_PAIRS // n + 1)
        body.pop("prompts", None)
    elif fault == "empty query":
        body["query"][draw(st.integers(0, n - 1))] = ""
    if fault == "deep nesting":
        depth = draw(st.integers(5_000, 200_000))
        data = b'{"query": ' + b"[" * depth + b"]" * depth + b"}"
    elif fault == "not an object":
        data = json.dumps(draw(JSON.filter(lambda v: not isinstance(v, dict)))).encode()
    elif fault == "not JSON":
        data = draw(st.binary(max_size=64).filter(lambda b: not _is_json(b)))
    elif fault == "not UTF-8":
        data = json.dumps(body).encode()[:-1] + b', "x": "\xff"}'  # a byte that is never UTF-8
    else:
        data = json.dumps(body).encode()
    return data, content_type, 200 if fault == "valid" else 400, fault


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
        return True
    except (ValueError, RecursionError):
        return False


def test_fuzz_http_get_reward(reward, request):
    """Every client mistake on the OpenRLHF port is a 4xx with a message, never a 500 (issue 13.8:
    deep nesting, truncation as a list or object, lone surrogate escapes were 500)."""
    counts: dict[str, int] = {}
    wrong: list[str] = []
    headers = lambda ct: {"Content-Type": ct, "Authorization": f"Bearer {TOKEN}"}  # noqa: E731
    fixed = json.dumps({"query": ["<|user|>What is 17 times 23?<|assistant|>391."]}).encode()
    before = _raw_post(reward.http_port, fixed, headers("application/json"))

    @settings(FUZZ, max_examples=100)
    @given(st.lists(http_case(), min_size=BATCH, max_size=BATCH))
    def run(cases):
        replies = list(reward.pool.map(lambda c: _raw_post(reward.http_port, c[0], headers(c[1])), cases))
        for (data, _, want, what), (status, body) in zip(cases, replies):
            counts[str(status)] = counts.get(str(status), 0) + 1
            if status != want or (status != 200 and not body.get("error")):
                if len(wrong) < 20:
                    wrong.append(f"[{what}] got {status} {str(body)[:200]}, want {want}; body {data[:120]!r}")
            elif status == 200:
                n = len(json.loads(data)["query"])
                if not (len(body["rewards"]) == n and all(math.isfinite(x) for x in body["rewards"])):
                    wrong.append(f"[{what}] wrong answer {body}")

    issue_13_8 = {"deep nesting": b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                  "truncation as a list": b'{"query": ["a b"], "truncation": ["reject"]}',
                  "truncation as an object": b'{"query": ["a b"], "truncation": {"mode": "reject"}}',
                  "lone surrogate escape": b'{"query": ["a \\ud800 b"]}'}
    for what, data in issue_13_8.items():
        status, body = _raw_post(reward.http_port, data, headers("application/json"))
        counts[str(status)] = counts.get(str(status), 0) + 1
        if status != 400 or not body.get("error"):
            wrong.append(f"[issue 13.8 {what}] got {status} {body}")
    run()
    same = _raw_post(reward.http_port, fixed, headers("application/json")) == before
    record(request, "Fuzz HTTP POST /get_reward (valid OpenRLHF bodies, or one mistake each)",
           cases=sum(counts.values()), errors=", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
           lost=0 if same else "fixed answer changed",
           result="pass" if not wrong and same else "FAIL: " + " | ".join(wrong[:3]))
    assert same and before[0] == 200
    assert not wrong, "\n".join(wrong)


def test_token_comparison_is_constant_time(monkeypatch):
    """Both doors compare the bearer token with hmac.compare_digest, never with ==."""
    import ast
    import hmac
    import inspect

    from services.common import interceptor
    from services.reward import http

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))

    class Md:
        def __init__(self, k, v):
            self.key, self.value = k, v

    i = interceptor.ServerInterceptor("tok")
    assert not i._authorized(REWARD, [Md("authorization", "Bearer nope")])
    assert i._authorized(REWARD, [Md("authorization", "Bearer tok")])
    assert seen == [(b"Bearer nope", b"Bearer tok"), (b"Bearer tok", b"Bearer tok")]

    # The HTTP handler: compare_digest is called on the header, and no == / != touches the token.
    tree = ast.parse(inspect.getsource(http))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "hmac.compare_digest"]
    assert calls, "services/reward/http.py does not use hmac.compare_digest"
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            text = ast.unparse(node)
            assert "expected" not in text and "token" not in text.lower(), text


# ---- 3. load ---------------------------------------------------------------------------------

def test_load_64_clients_60s(reward, request):
    bench = load_bench()
    r = asyncio.run(bench.run_load(reward.server.address, "reward", clients=64, duration=60, config=AUTH,
                                   pid=reward.server.pid, warmup=10, pairs=4, timeout=60))
    time.sleep(2)
    after = tree_rss(reward.server.pid)
    growth = max(r["rss_max_after_warmup"], after) / r["rss_warm"] - 1
    same = fixed_scores(reward.stub) == reward.baseline
    record(request, "Load: RewardService.Score, 64 clients x 60 s (4 pairs each)", cases=r["requests"],
           load=f"64 clients, {r['duration_s']} s, {r['rps']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms",
           errors=r["errors"], memory=f"before {mib(r['rss_before'])}, after warm-up {mib(r['rss_warm'])}, "
                                      f"max {mib(r['rss_max_after_warmup'])}, after {mib(after)} ({growth:+.1%})",
           lost=0 if same else "fixed answer changed",
           result="pass" if r["errors"] == 0 and growth <= 0.10 and same else "FAIL")
    assert r["errors"] == 0, r["codes"]
    assert growth <= 0.10, r
    assert same and health_status(reward.server.address, REWARD, AUTH) == 1


@pytest.fixture(scope="module")
def limited(tiny_reward_dir, reliability_logs):
    """Small limits on purpose: 16 queued pairs, 24 RPCs in flight."""
    with reward_server(tiny_reward_dir, reliability_logs, "--max-queue", "16", "--max-concurrent-rpcs", "24",
                       "--max-wait-ms", "20") as server:
        yield server


def test_overload_is_fast_resource_exhausted(limited, request):
    bench = load_bench()
    with create_channel(limited.address, ClientConfig()) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        before = fixed_scores(stub)
        r = asyncio.run(bench.run_load(limited.address, "reward", clients=128, duration=15, pairs=4, timeout=30,
                                       pid=limited.pid, warmup=3))
        time.sleep(1)
        calm = asyncio.run(bench.run_load(limited.address, "reward", clients=2, duration=3, pairs=4, timeout=30))
        after = fixed_scores(stub)
    refused = r["codes"].get("RESOURCE_EXHAUSTED", 0)
    ok = set(r["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"} and refused > 0 and r["ok"] > 0
    fast = r["p99_ms_by_code"].get("RESOURCE_EXHAUSTED", 0) < 2500  # deadline 30 s; the client shares 2 cores
    record(request, "Overload: RewardService, 128 clients vs --max-queue 16 / --max-concurrent-rpcs 24, 15 s",
           cases=r["requests"] + calm["requests"],
           load=f"128 clients; OK p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms",
           errors=f"codes {r['codes']}; RESOURCE_EXHAUSTED p50 {r['p50_ms_by_code'].get('RESOURCE_EXHAUSTED')} ms "
                  f"p99 {r['p99_ms_by_code'].get('RESOURCE_EXHAUSTED')} ms (deadline 30 s); "
                  f"afterwards {calm['codes']}",
           memory=f"max {mib(r['rss_max'])}", lost=0 if before == after else "fixed answer changed",
           result="pass" if ok and fast and calm["errors"] == 0 and before == after else "FAIL")
    assert ok, r
    assert fast, r
    assert calm["errors"] == 0 and calm["ok"] > 0, calm
    assert before == after


# ---- 4. shutdown under load ------------------------------------------------------------------

@pytest.mark.xfail(strict=False, reason="grpc core cancels calls it received but had not dispatched when "
                   "server.stop() runs: a few end CANCELLED instead of UNAVAILABLE under continuous load "
                   "(upstream grpc/grpc#41785, fix in grpc/grpc#41786; docs/reliability.md)")
def test_sigterm_under_load_drains(tiny_reward_dir, reliability_logs, request):
    from shutdown_check import sigterm_under_load

    server = reward_server(tiny_reward_dir, reliability_logs, "--grace-seconds", "10", "--max-wait-ms", "20")
    with server:
        row, failed = sigterm_under_load(server, REWARD, ClientConfig(), "reward", grace=10, clients=32)
    record(request, "SIGTERM under load: RewardService, 32 clients", **row)
    assert not failed, (failed, row)


# ---- 6. hostile reward functions (issue 21, items 1-4) -----------------------------------------

HOSTILE = """
import os, time


def huge(prompt, response):
    return 1e308 if "huge" in response else 0.0


def slow(prompt, response):
    if "slow" in response:
        time.sleep(30)
    return 0.0


def exits(prompt, response):
    if "exit" in response:
        raise SystemExit(3)
    if "interrupt" in response:
        raise KeyboardInterrupt
    if "die" in response:
        os._exit(7)
    return 0.0
"""
FUNCTION_LIMIT_S = 2.0


@contextlib.contextmanager
def health_watch(address: str):
    """Health checks every 50 ms in a thread while the block runs; what it yields fills with the
    time between answers (gaps) and the checks unanswered (failed)."""
    seen, stop = types.SimpleNamespace(gaps=[], failed=0), threading.Event()

    def watch():
        last = time.monotonic()
        while not stop.is_set():
            ok = health_status(address, REWARD, timeout=10.0) == 1
            if ok:
                seen.gaps.append(time.monotonic() - last)
                last = time.monotonic()
            seen.failed += not ok
            stop.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="module")
def hostile(reliability_logs, tmp_path_factory):
    """A service of reward functions only (no model): the user's module and a built-in regex that
    backtracks exponentially in Python's re, in one mix, with a 2 s limit per call."""
    import sys

    from services.demo.launch import ChildServer, rlhf_command

    lib = tmp_path_factory.mktemp("hostile")
    (lib / "hostile_rules.py").write_text(HOSTILE)
    port = free_port()
    argv = rlhf_command("serve", "reward", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                        "--reward-function", "huge=hostile_rules:huge", "--reward-function", "slow=hostile_rules:slow",
                        "--reward-function", "exits=hostile_rules:exits",
                        "--reward-function", "fmt=builtin:regex:(a+)+b", "--reward-mix", "huge=10,slow=1,exits=1,fmt=1",
                        "--reward-function-timeout-s", str(FUNCTION_LIMIT_S), "--reward-function-workers", "4")
    with ChildServer(argv, port=port, service=REWARD, env={"RLHF_AUTH_TOKEN": "", "PYTHONPATH": f"{lib}:{sys.path[0]}"},
                     log_path=reliability_logs / f"hostile-{port}.log") as server:
        yield server


def _score_text(stub, response: str, timeout: float = 120):
    request = reward_pb2.ScoreRequest(pairs=[reward_pb2.ScorePair(prompt=common_pb2.TextOrTokens(text="Q?"),
                                                                  response=common_pb2.TextOrTokens(text=response))])
    start = time.monotonic()
    try:
        return stub.Score(request, timeout=timeout), time.monotonic() - start
    except grpc.RpcError as e:
        return e, time.monotonic() - start


def test_hostile_reward_functions_cannot_stall_or_poison_the_service(hostile, request):
    """Issue 21.1-21.4 on a live server: a score that would be inf, a regular expression that
    backtracks, a function that sleeps 30 s called by 5 requests at once next to an unrelated one,
    and SystemExit / KeyboardInterrupt / os._exit from a function. Each is INVALID_ARGUMENT naming
    what, health answers throughout, and the service serves on."""
    with create_channel(hostile.address, ClientConfig()) as channel, health_watch(hostile.address) as health:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        # 1. inf after the weight: was OK with score=inf
        inf, _ = _score_text(stub, "huge")
        # 2. (a+)+b on 27 a's and '!': was 6 s with health silent for 5.8 s
        regex = [_score_text(stub, "a" * n + "!") for n in (27, 60_000)]
        # 3. 5 requests of a function sleeping 30 s, then an unrelated one: it waited 28 s
        pool = concurrent.futures.ThreadPoolExecutor(6)
        slow = [pool.submit(_score_text, stub, "slow") for _ in range(5)]
        time.sleep(0.3)
        unrelated, unrelated_s = _score_text(stub, "fine")
        slow = [f.result() for f in slow]
        pool.shutdown()
        # 4. any exit of user code: SystemExit was INTERNAL
        exits = [_score_text(stub, word) for word in ("exit", "interrupt", "die")]
        time.sleep(2)
        after, _ = _score_text(stub, "fine")
    ia = grpc.StatusCode.INVALID_ARGUMENT
    slow_s = max(t for _, t in slow)
    checks = {
        "inf: INVALID_ARGUMENT naming the component": isinstance(inf, grpc.RpcError) and inf.code() == ia
        and "reward component huge is 1e+308, not a finite float32" in inf.details(),
        "regex: answered at once": all(not isinstance(r, grpc.RpcError) and r.results[0].components["fmt"] == 0.0
                                       and t < 2.0 for r, t in regex),
        "slow: INVALID_ARGUMENT at the limit": all(isinstance(r, grpc.RpcError) and r.code() == ia and
                                                   "took longer than the time limit of 2 s" in r.details()
                                                   for r, _ in slow) and slow_s < 30,
        "unrelated: answered": not isinstance(unrelated, grpc.RpcError) and unrelated_s < 15,
        "exits: INVALID_ARGUMENT naming the function": [e.code() if isinstance(e, grpc.RpcError) else "OK"
                                                        for e, _ in exits] == [ia] * 3
        and "SystemExit: 3" in exits[0][0].details() and "KeyboardInterrupt" in exits[1][0].details()
        and "ended its worker process" in exits[2][0].details() and "exits (hostile_rules:exits)" in exits[0][0].details(),
        "serves on": not isinstance(after, grpc.RpcError) and after.results[0].score == 0.0,
        "health: never silent 3 s": max(health.gaps, default=math.inf) < 3.0 and health.failed == 0,
    }
    record(request, "Hostile reward functions (issue 21.1-21.4): inf x weight, (a+)+b regex, 30 s sleep x 5 + an "
                    "unrelated Score, SystemExit / KeyboardInterrupt / os._exit", cases=1 + 2 + 6 + 3 + 1,
           faults="1e308 x 10; 27 and 60,000 a's + '!'; 5 calls of 30 s (limit 2 s, 4 workers); 3 exits",
           errors=f"inf: {inf.code().name if isinstance(inf, grpc.RpcError) else 'OK'}; exits: "
                  f"{[e.code().name if isinstance(e, grpc.RpcError) else 'OK' for e, _ in exits]}; slow: "
                  f"{[r.code().name if isinstance(r, grpc.RpcError) else 'OK' for r, _ in slow]} after at most "
                  f"{slow_s:.1f} s",
           load=f"regex Score {regex[0][1] * 1000:.0f} ms (27 a's), {regex[1][1] * 1000:.0f} ms (60,000 a's); "
                f"unrelated Score {unrelated_s:.1f} s; health: longest silence "
                f"{max(health.gaps, default=math.inf) * 1000:.0f} ms, "
                f"{health.failed} unanswered of {len(health.gaps) + health.failed}",
           lost=0 if checks["serves on"] else "did not serve on",
           result="pass" if all(checks.values()) else "FAIL: " + ", ".join(k for k, v in checks.items() if not v))
    assert all(checks.values()), checks
