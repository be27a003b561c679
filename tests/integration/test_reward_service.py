"""RewardService against a real `rlhf serve reward` process on loopback.

The reference is the model loaded here with transformers (AutoModelForSequenceClassification),
one pair at a time without padding, on inputs built the documented way:
tokens(format_prompt(prompt)) + tokens(response) + [eos].
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command
from services.common.text import format_prompt
from services.reward.client import AsyncRewardClient, RewardClient

SERVICE = "rlhf.v1.RewardService"
MAX_LENGTH = 64
MAX_PAIRS = 16
MAX_TEXT_BYTES = 2048
SCORE_MEAN, SCORE_STD = 0.25, 2.0
TOKEN = "s3cret-token"

PAIRS = [
    ("What is 2+2?", "4"),
    ("Name a color.", "Blue is a color that many people like."),
    ("Tell me a story about a cat.", "Once upon a time a cat sat on a mat and looked at the moon for a long while."),
    ("Hi", "Hello! How can I help you today?"),
    ("Café?", "Oui, un café ☕, merci."),
    ("List three fruits.", "Apple, banana, cherry."),
]


@pytest.fixture(scope="module")
def reward_dir(tiny_reward_dir, tmp_path_factory):
    """The tiny reward model plus training metadata (score statistics for normalize)."""
    d = tmp_path_factory.mktemp("rm") / "reward"
    shutil.copytree(tiny_reward_dir, d)
    (d / "reward_meta.json").write_text(json.dumps(
        {"score_mean": SCORE_MEAN, "score_std": SCORE_STD, "eval_accuracy": 0.75}))
    return d


@pytest.fixture(scope="module")
def reference(reward_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32).eval()

    class Ref:
        tokenizer = tok

        @staticmethod
        def parts(prompt: str, response: str) -> tuple[list[int], list[int]]:
            p = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
            r = tok(response, add_special_tokens=False)["input_ids"]
            return list(p), list(r)

        @staticmethod
        def ids(prompt: str, response: str) -> list[int]:
            p, r = Ref.parts(prompt, response)
            return p + r + [tok.eos_token_id]

        @staticmethod
        def score_ids(ids: list[int]) -> float:
            with torch.no_grad():
                return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

        @staticmethod
        def score(prompt: str, response: str) -> float:
            return Ref.score_ids(Ref.ids(prompt, response))

    return Ref


def _serve(model_dir, tmp_path_factory, *extra, env=None):
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("logs") / "reward.log"
    argv = rlhf_command("serve", "reward", "--model", str(model_dir), "--host", "127.0.0.1",
                        "--port", str(port), "--metrics-port", str(metrics_port), "--http-port", str(http_port),
                        "--device", "cpu", *extra)
    server = ChildServer(argv, port=port, service=SERVICE, env={"RLHF_AUTH_TOKEN": "", **(env or {})},
                         log_path=log, ready_timeout=180)
    server.http_url = f"http://127.0.0.1:{http_port}/get_reward"
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return server


@pytest.fixture(scope="module")
def server(reward_dir, tmp_path_factory):
    with _serve(reward_dir, tmp_path_factory, "--max-length", str(MAX_LENGTH), "--max-pairs", str(MAX_PAIRS),
                "--max-text-bytes", str(MAX_TEXT_BYTES)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.address, ClientConfig()) as c:
        yield c


@pytest.fixture(scope="module")
def guarded(reward_dir, tmp_path_factory):
    """Auth on, a queue of 4 pairs and a long max wait (so that a flood finds the queue full);
    HTTP bodies read as (raw prompt, prompt + response) pairs."""
    with _serve(reward_dir, tmp_path_factory, "--max-queue", "4", "--max-wait-ms", "300", "--http-input", "pairs",
                env={"RLHF_AUTH_TOKEN": TOKEN}) as s:
        yield s


def post(url: str, body, token: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def close(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)


def assert_serving(client, reference):
    """After a rejected request the service still scores correctly."""
    p, r = PAIRS[1]
    assert close(client.scores([(p, r)])[0], reference.score(p, r))


# ---- service vs library ---------------------------------------------------------------------

def test_single_requests_match_library(client, reference):
    for p, r in PAIRS:
        reply = client.score([(p, r)])
        (res,) = reply.results
        assert close(res.raw_score, reference.score(p, r)), (p, r)
        assert res.score == res.raw_score  # normalize off
        assert not res.truncated
        assert res.num_tokens == len(reference.ids(p, r))


def test_batch_matches_library_and_carries_the_version(client, reference, reward_dir):
    import hashlib

    reply = client.score(PAIRS, request_id="batch-1")
    assert reply.request_id == "batch-1"
    assert [close(r.raw_score, reference.score(p, s)) for r, (p, s) in zip(reply.results, PAIRS)] == [True] * len(PAIRS)
    h = hashlib.sha256()
    for f in sorted(reward_dir.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    info = client.model_info()
    assert reply.model_version == info.model_version
    assert re.fullmatch(r"[0-9a-f]{16}", reply.model_version)
    assert info.model_version == h.hexdigest()[:16]


def test_normalize_uses_training_statistics(client, reference):
    p, r = PAIRS[2]
    (res,) = client.score([(p, r)], normalize=True).results
    assert close(res.raw_score, reference.score(p, r))
    assert close(res.score, (res.raw_score - SCORE_MEAN) / SCORE_STD)


def test_token_ids_score_like_text(client, reference):
    eos = reference.tokenizer.eos_token_id
    as_text = client.scores(PAIRS)
    parts = [reference.parts(p, r) for p, r in PAIRS]
    as_ids = client.scores(parts)
    with_eos = client.scores([(p, r + [eos]) for p, r in parts])  # a completion that stopped on EOS
    mixed = client.scores([(p, r_ids) for (p, _), (_, r_ids) in zip(PAIRS, parts)])
    for a, b, c, d in zip(as_text, as_ids, with_eos, mixed):
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5) and a == pytest.approx(d, abs=1e-5)


def test_stream_answers_in_order_and_matches_library(client, reference, server):
    batches = [[PAIRS[i % len(PAIRS)]] for i in range(40)] + [PAIRS]
    before = _metric(server, "rlhf_reward_batch_size_count")
    replies = list(client.score_stream(batches))
    after = _metric(server, "rlhf_reward_batch_size_count")
    assert [r.request_id for r in replies] == [str(i) for i in range(len(batches))]
    for reply, batch in zip(replies, batches):
        assert [close(x.raw_score, reference.score(p, r)) for x, (p, r) in zip(reply.results, batch)] == [True] * len(batch)
    # Pipelined: requests of the one stream were batched together (one at a time would be 41 forwards).
    assert after - before < len(batches) - 5


def test_async_client_concurrent_requests(server, reference):
    async def main():
        async with AsyncRewardClient(server.address, ClientConfig()) as c:
            replies = await asyncio.gather(*(c.scores([PAIRS[i % len(PAIRS)]]) for i in range(32)))
            streamed = [r async for r in c.score_stream([PAIRS[:2], PAIRS[2:]])]
            return replies, streamed

    replies, streamed = asyncio.run(main())
    for i, (score,) in enumerate(replies):
        assert close(score, reference.score(*PAIRS[i % len(PAIRS)]))
    assert [len(r.results) for r in streamed] == [2, len(PAIRS) - 2]


def test_compare(client, reference):
    prompt, first, second = "Name a color.", "Blue.", "I do not know any colors at all, sorry."
    reply = client.compare(prompt, first, second)
    a, b = reference.score(prompt, first), reference.score(prompt, second)
    assert close(reply.first_score, a) and close(reply.second_score, b)
    assert reply.prob_first_preferred == pytest.approx(1 / (1 + math.exp(-(a - b))), abs=1e-5)
    assert not reply.truncated and reply.model_version
    swapped = client.compare(prompt, second, first)
    assert swapped.prob_first_preferred == pytest.approx(1 - reply.prob_first_preferred, abs=1e-5)


def test_model_info(client):
    info = client.model_info()
    assert info.architecture == "LlamaForSequenceClassification"
    assert info.dtype == "float32"
    assert info.max_length == MAX_LENGTH
    assert info.score_mean == pytest.approx(SCORE_MEAN) and info.score_std == pytest.approx(SCORE_STD)
    assert info.eval_accuracy == pytest.approx(0.75)
    assert info.max_pairs == MAX_PAIRS and info.max_batch_size == 64 and info.max_batch_tokens == 16384
    assert info.max_text_bytes == MAX_TEXT_BYTES
    assert [(c.name, c.weight, c.kind) for c in info.components] == [("rm", 1.0, "model")]
    assert re.fullmatch(r"[0-9a-f]+", info.instance_id)
    assert info.weights_version == info.model_version and list(info.model_roots) == []


def test_load_model_is_off_without_a_model_root(client, reward_dir):
    with pytest.raises(grpc.RpcError) as e:
        client.load_model(str(reward_dir))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "LoadModel is off on this server: start it with --model-root" in e.value.details()


def templated(tok, prompt: str) -> str:
    """The prompt as OpenRLHF's PromptDataset writes it: apply_chat_template(tokenize=False,
    add_generation_prompt=True) over one user turn."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def openrlhf_single_turn_body(tok, prompt: str, response: str, stopped: bool = True) -> dict:
    """What OpenRLHF 0.10.x/0.11.0's SingleTurnAgentExecutor posts for one sample: the prompt's ids
    (tokenized without special tokens) + the generated ids (ending in EOS when the completion
    stopped on it), decoded with special tokens kept; no Authorization header."""
    prompt_ids = tok(templated(tok, prompt), add_special_tokens=False)["input_ids"]
    action_ids = tok(response, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if stopped else [])
    query = tok.decode(prompt_ids + action_ids, skip_special_tokens=False)
    return {"query": [query], "prompts": [templated(tok, prompt)], "labels": [""]}


def openrlhf_padded_batch_body(tok, pairs) -> dict:
    """What OpenRLHF 0.6-0.8's experience maker (vLLM path) posts for a batch: prompts left-padded
    to the longest, outputs (ending in EOS) right-padded, the batch decoded with special tokens kept."""
    prompts = [tok(templated(tok, p), add_special_tokens=False)["input_ids"] for p, _ in pairs]
    outputs = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, r in pairs]
    width_in, width_out = max(map(len, prompts)), max(map(len, outputs))
    pad = tok.pad_token_id
    sequences = [[pad] * (width_in - len(p)) + p + o + [pad] * (width_out - len(o)) for p, o in zip(prompts, outputs)]
    return {"query": tok.batch_decode(sequences, skip_special_tokens=False),
            "prompts": [templated(tok, p) for p, _ in pairs], "labels": [""] * len(pairs)}


def test_openrlhf_bodies_score_exactly_like_grpc(server, client, reference):
    """POST /get_reward with the bodies OpenRLHF builds gives the gRPC Score of the same
    (prompt, response) pairs: the same token ids reach the model (equal num_tokens, and equal
    scores for pairs scored alone).

    Mirrors OpenRLHF as read at its tags: v0.11.0 and v0.10.0 (openrlhf/utils/agent.py,
    SingleTurnAgentExecutor.execute; prompts from openrlhf/datasets/prompts_dataset.py with
    apply_chat_template(..., tokenize=False, add_generation_prompt=True)); v0.6.0-v0.8.x
    (openrlhf/trainer/ppo_utils/experience_maker.py, vLLM path: left-padded prompts, right-padded
    outputs, batch_decode(skip_special_tokens=False); remote_rm_fn posts query/prompts/labels).
    OpenRLHF's own server (openrlhf/cli/serve_rm.py) strips pad/EOS text and appends one EOS in
    v0.5.0-v0.8.x; from v0.9.0 it scores the query as sent, which for a completion that stopped on
    EOS is the same text. A completion cut by max_tokens (no EOS) gets the EOS our reward model was
    trained to score at, here and over gRPC alike."""
    tok = reference.tokenizer
    for prompt, response in PAIRS:
        (want,) = client.score([(prompt, response)]).results
        for stopped in (True, False):
            status, body = post(server.http_url, openrlhf_single_turn_body(tok, prompt, response, stopped))
            assert status == 200, body
            assert body["rewards"] == body["scores"] == [want.raw_score], (prompt, stopped)
            assert body["extra_logs"]["num_tokens"] == [float(want.num_tokens)]
    want = client.score(PAIRS).results
    status, body = post(server.http_url, openrlhf_padded_batch_body(tok, PAIRS))
    assert status == 200, body
    assert body["rewards"] == pytest.approx([r.raw_score for r in want], abs=1e-6)
    assert body["extra_logs"]["num_tokens"] == [float(r.num_tokens) for r in want]
    # prompts are optional in this mode: the query alone says what to score
    body = openrlhf_padded_batch_body(tok, PAIRS[:2])
    status, reply = post(server.http_url, {"query": body["query"]})
    assert status == 200 and reply["rewards"] == pytest.approx([r.raw_score for r in want[:2]], abs=1e-6)
    # normalize, as on gRPC
    status, reply = post(server.http_url, {**openrlhf_single_turn_body(tok, *PAIRS[0]), "normalize": True})
    assert status == 200 and close(reply["rewards"][0], (reference.score(*PAIRS[0]) - SCORE_MEAN) / SCORE_STD)


def test_http_pairs_input_templates_the_raw_prompt(guarded, reference):
    queries = [p + r for p, r in PAIRS[:3]]
    status, body = post(guarded.http_url, {"query": queries, "prompts": [p for p, _ in PAIRS[:3]]}, TOKEN)
    assert status == 200, body
    for got, (p, r) in zip(body["rewards"], PAIRS):
        assert close(got, reference.score(p, r))
    status, body = post(guarded.http_url, {"query": ["Hello there"], "prompts": ["Bye"]}, TOKEN)
    assert status == 400 and "query[0] must start with prompts[0]" in body["error"]
    status, body = post(guarded.http_url, {"query": ["Hi"], "prompts": ["Hi"]}, TOKEN)
    assert status == 400 and "must not be empty" in body["error"]
    status, body = post(guarded.http_url, {"query": ["Hi there"]}, TOKEN)
    assert status == 400 and "prompts must be a list of strings" in body["error"]


def test_http_bad_input(server, client, reference):
    status, body = post(server.http_url, {"query": [], "prompts": []})
    assert status == 400 and "--max-pairs" in body["error"]
    status, body = post(server.http_url, {"query": [""]})
    assert status == 400 and "query[0] must not be empty" in body["error"]
    status, body = post(server.http_url, {"prompts": ["Hi"]})
    assert status == 400 and "query must be a list of strings" in body["error"]
    status, body = post(server.http_url, {"query": ["a", "b"], "prompts": ["a"]})
    assert status == 400 and "one prompt per query" in body["error"]
    status, body = post(server.http_url, b"{not json")
    assert status == 400 and "JSON" in body["error"]
    status, body = post(server.http_url, {"query": ["Hi there"], "truncation": "middle"})
    assert status == 400 and "truncation" in body["error"]
    assert_serving(client, reference)


def test_metrics_exported(server, client):
    client.scores(PAIRS[:2])
    post(server.http_url, {"query": ["<|user|>Hi<|assistant|>Hello"]})
    post(server.http_url, {"query": "not a list"})
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for name in ("rlhf_reward_samples_total", "rlhf_reward_batch_size_bucket",
                 "rlhf_reward_batch_tokens_bucket", "rlhf_reward_queue_seconds_bucket",
                 "rlhf_reward_inference_seconds_bucket", "rlhf_reward_score_bucket", "rlhf_reward_queue_depth",
                 'rlhf_reward_component_value_bucket{component="rm"',
                 'rlhf_reward_http_requests_total{code="200",path="/get_reward"}',
                 'rlhf_reward_http_requests_total{code="400",path="/get_reward"}',
                 'rlhf_reward_http_request_seconds_bucket{le="0.005",path="/get_reward"}',
                 "rlhf_reward_http_requests_in_flight",
                 'grpc_server_handled_total{grpc_code="OK",grpc_method="Score"'):
        assert name in text, name
    # one request counter per method is the interceptor's; the service adds none of its own
    assert "rlhf_reward_requests_total" not in text
    assert _metric(server, "rlhf_reward_samples_total") >= 2


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1))


# ---- truncation -----------------------------------------------------------------------------

def test_keep_end_of_prompt_truncates_and_reports(server, client, reference):
    long_prompt = " ".join(f"word{i}" for i in range(80))
    response = "A short answer."
    with pytest.raises(grpc.RpcError) as e:
        client.score([(long_prompt, response)])  # default: reject
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pairs[0]" in e.value.details() and f"--max-length={MAX_LENGTH}" in e.value.details()

    reply = client.score([(long_prompt, response), PAIRS[0]], truncation="keep_end_of_prompt")
    cut, whole = reply.results
    p, r = reference.parts(long_prompt, response)
    r = r + [reference.tokenizer.eos_token_id]
    kept = p[len(p) - (MAX_LENGTH - len(r)):] + r
    assert cut.truncated and cut.num_tokens == MAX_LENGTH == len(kept)
    assert close(cut.raw_score, reference.score_ids(kept))
    assert not whole.truncated and close(whole.raw_score, reference.score(*PAIRS[0]))

    cmp = client.compare(long_prompt, response, "Another answer.", truncation="keep_end_of_prompt")
    assert cmp.truncated
    with pytest.raises(grpc.RpcError) as e:
        client.compare(long_prompt, response, "Another answer.")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "(prompt, first)" in e.value.details() and f"--max-length={MAX_LENGTH}" in e.value.details()

    tok = reference.tokenizer
    status, body = post(server.http_url, {**openrlhf_single_turn_body(tok, long_prompt, response),
                                          "truncation": "keep_end_of_prompt"})
    assert status == 200 and body["extra_logs"]["truncated"] == [1.0]
    assert close(body["rewards"][0], cut.raw_score)

    # A response that does not fit alone is rejected even when the prompt may be cut.
    with pytest.raises(grpc.RpcError) as e:
        client.score([("Hi", " ".join(["token"] * 200))], truncation="keep_end_of_prompt")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "response" in e.value.details()


# ---- bad input ------------------------------------------------------------------------------

def _stub(server, token: str | None = None):
    from services.common.channel import create_channel
    channel = create_channel(server.address, ClientConfig(auth_token=token))
    return channel, reward_pb2_grpc.RewardServiceStub(channel)


def _pair(prompt, response):
    from services.reward.client import text_or_tokens
    return reward_pb2.ScorePair(prompt=text_or_tokens(prompt), response=text_or_tokens(response))


@pytest.mark.parametrize("request_kw, code, words", [
    (dict(pairs=[]), "INVALID_ARGUMENT", ["pairs", "--max-pairs"]),
    (dict(pairs=[("", "x")]), "INVALID_ARGUMENT", ["pairs[0].prompt.text", "must not be empty"]),
    (dict(pairs=[("x", "")]), "INVALID_ARGUMENT", ["pairs[0].response.text", "must not be empty"]),
    (dict(pairs=[("x", "y" * (MAX_TEXT_BYTES + 1))]), "INVALID_ARGUMENT",
     ["pairs[0].response.text", f"--max-text-bytes={MAX_TEXT_BYTES}"]),
    (dict(pairs=[("x", "y")], truncation=7), "INVALID_ARGUMENT", ["truncation", "got 7"]),
    (dict(pairs=[("x", "y")] * (MAX_PAIRS + 1)), "INVALID_ARGUMENT", ["pairs", "--max-pairs", str(MAX_PAIRS + 1)]),
    (dict(pairs=[("x", [5, 10**6])]), "INVALID_ARGUMENT", ["pairs[0].response.token_ids.ids[1]", "vocabulary"]),
    (dict(pairs=[("x", "y")], request_id="r" * 129), "INVALID_ARGUMENT", ["request_id", "128"]),
])
def test_bad_score_requests_are_rejected_and_service_goes_on(server, client, reference, request_kw, code, words):
    kw = dict(request_kw)
    kw["pairs"] = [_pair(p, r) for p, r in kw.get("pairs", [])]
    channel, stub = _stub(server)
    with channel:
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(reward_pb2.ScoreRequest(**kw), timeout=30)
    assert e.value.code() == getattr(grpc.StatusCode, code), e.value.details()
    for w in words:
        assert w in e.value.details(), (w, e.value.details())
    assert_serving(client, reference)


def test_missing_oneof_and_bad_compare(server, client, reference):
    channel, stub = _stub(server)
    with channel:
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(reward_pb2.ScoreRequest(pairs=[reward_pb2.ScorePair()]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pairs[0].prompt" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Compare(reward_pb2.CompareRequest(prompt=_pair("x", "y").prompt, first=_pair("x", "y").response,
                                                   truncation=7), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncation" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Compare(reward_pb2.CompareRequest(prompt=_pair("x", "y").prompt, first=_pair("x", "y").response),
                         timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "second" in e.value.details()
    assert_serving(client, reference)


def test_bad_request_inside_a_stream_ends_it_with_invalid_argument(client, reference):
    with pytest.raises(grpc.RpcError) as e:
        list(client.score_stream([PAIRS[:1], [("", "x")]]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ScoreStream message 1: pairs[0].prompt.text" in e.value.details()
    assert_serving(client, reference)


# ---- queue limit and auth (a second server: auth on, queue of 4 pairs) --------------------------

def test_full_queue_is_resource_exhausted_and_service_goes_on(guarded, reference):
    async def flood():
        async with AsyncRewardClient(guarded.address, ClientConfig(auth_token=TOKEN)) as c:
            return await asyncio.gather(*(c.scores(PAIRS[:3]) for _ in range(8)), return_exceptions=True)

    results = asyncio.run(flood())
    errors = [r for r in results if isinstance(r, Exception)]
    ok = [r for r in results if not isinstance(r, Exception)]
    assert errors and ok
    for err in errors:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue=4" in err.details(), err
    for scores in ok:
        assert [close(s, reference.score(p, r)) for s, (p, r) in zip(scores, PAIRS[:3])] == [True] * 3
    with RewardClient(guarded.address, ClientConfig(auth_token=TOKEN)) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.score(PAIRS[:5])  # more than the whole queue holds
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue=4" in e.value.details()
        assert close(c.scores([PAIRS[0]])[0], reference.score(*PAIRS[0]))


def test_auth(guarded, reference):
    for token in (None, "wrong-token"):
        with RewardClient(guarded.address, ClientConfig(auth_token=token)) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.score([PAIRS[0]])
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        status, body = post(guarded.http_url, {"query": [PAIRS[0][0] + PAIRS[0][1]], "prompts": [PAIRS[0][0]]}, token)
        assert status == 401, body
    with RewardClient(guarded.address, ClientConfig(auth_token=TOKEN)) as c:
        assert close(c.scores([PAIRS[0]])[0], reference.score(*PAIRS[0]))
    status, body = post(guarded.http_url, {"query": [PAIRS[0][0] + PAIRS[0][1]], "prompts": [PAIRS[0][0]]}, TOKEN)
    assert status == 200 and close(body["rewards"][0], reference.score(*PAIRS[0]))


# ---- the client needs no torch --------------------------------------------------------------------

def test_clients_import_without_torch():
    code = ("import sys, services.reward.client, services.policy.client; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'vllm' not in sys.modules, 'vllm was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- chat messages over gRPC ------------------------------------------------------------------------

def test_messages_prompt_over_grpc(client, reference):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    rendered = reference.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = reference.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    (as_chat,), (as_ids,) = client.score([(chat, "Blue.")]).results, client.score([(ids, "Blue.")]).results
    assert as_chat.raw_score == as_ids.raw_score and as_chat.num_tokens == as_ids.num_tokens
    (one_turn,), (text,) = client.score([([chat[1]], "Blue.")]).results, client.score([("Name a color.", "Blue.")]).results
    assert one_turn.raw_score == text.raw_score
    cmp = client.compare(chat, "Blue.", "I refuse.")
    assert close(cmp.first_score, as_chat.raw_score)
    for bad, words in [([{"role": "", "content": "x"}], ["pairs[0].prompt.messages.messages[0].role", "empty"]),
                       ([{"role": "user", "content": "x" * MAX_TEXT_BYTES}],
                        ["pairs[0].prompt.messages.messages", f"--max-text-bytes={MAX_TEXT_BYTES}"])]:
        with pytest.raises(grpc.RpcError) as e:
            client.score([(bad, "ok")])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for w in words:
            assert w in e.value.details(), (w, e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        client.score([("Hi", chat)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages are for prompts" in e.value.details()


# ---- a reward model and reward functions, mixed -----------------------------------------------------

FUNCTIONS = '''
def politeness(prompt, response):
    return 1.0 if "please" in response.lower() else 0.0


def strict(prompt, response):
    if "boom" in response:
        raise ValueError("cannot grade this")
    return -1.0 if "?" in prompt else 0.0
'''
WEIGHTS = {"rm": 1.5, "polite": 0.5, "strict": 1.0, "long": -0.1}


@pytest.fixture(scope="module")
def mixed(reward_dir, tmp_path_factory):
    """The model and three functions (two imported from a module of the test's, one built-in);
    auth on for gRPC, off for HTTP (--http-no-auth)."""
    lib = tmp_path_factory.mktemp("functions")
    (lib / "reward_functions_of_the_test.py").write_text(FUNCTIONS)
    mod = "reward_functions_of_the_test"
    with _serve(reward_dir, tmp_path_factory, "--reward-function", f"polite={mod}:politeness",
                "--reward-function", f"strict={mod}:strict", "--reward-function", "long=builtin:length:words",
                "--reward-mix", ",".join(f"{k}={v}" for k, v in WEIGHTS.items()), "--http-no-auth",
                env={"RLHF_AUTH_TOKEN": TOKEN, "PYTHONPATH": f"{lib}:{sys.path[0]}"}) as s:
        s.client_config = ClientConfig(auth_token=TOKEN)
        yield s


def by_hand(reference, prompt: str, response: str) -> dict:
    return {"rm": reference.score(prompt, response), "polite": float("please" in response.lower()),
            "strict": -1.0 if "?" in prompt else 0.0, "long": float(len(response.split()))}


def test_mix_of_model_and_functions(mixed, reference):
    pairs = [("Name a color.", "Blue, please."), ("What is 2+2?", "It is 4 I think")]
    with RewardClient(mixed.address, mixed.client_config) as c:
        reply = c.score(pairs)
        normalized = c.score(pairs[:1], normalize=True).results[0]
        cmp = c.compare("What is 2+2?", "4.", "Four, please.")
    for res, (p, r) in zip(reply.results, pairs):
        values = by_hand(reference, p, r)
        assert dict(res.components) == pytest.approx(values, abs=1e-4)
        want = sum(WEIGHTS[k] * v for k, v in values.items())
        assert close(res.raw_score, want) and res.score == res.raw_score
    z = (reference.score(*pairs[0]) - SCORE_MEAN) / SCORE_STD
    assert close(normalized.components["rm"], z)
    assert close(normalized.score, 1.5 * z + 0.5 * 1.0 + 0.0 - 0.1 * 2)
    a = sum(WEIGHTS[k] * v for k, v in by_hand(reference, "What is 2+2?", "4.").items())
    b = sum(WEIGHTS[k] * v for k, v in by_hand(reference, "What is 2+2?", "Four, please.").items())
    assert close(cmp.first_score, a) and close(cmp.second_score, b)
    assert cmp.prob_first_preferred == pytest.approx(1 / (1 + math.exp(b - a)), abs=1e-5)


def test_mixed_model_info_lists_the_components(mixed, reward_dir):
    with RewardClient(mixed.address, mixed.client_config) as c:
        info = c.model_info()
    assert [(x.name, x.weight, x.kind, x.source) for x in info.components] == [
        ("rm", 1.5, "model", str(reward_dir)), ("polite", 0.5, "function", "reward_functions_of_the_test:politeness"),
        ("strict", 1.0, "function", "reward_functions_of_the_test:strict"),
        ("long", -0.1, "function", "builtin:length:words")]
    assert re.fullmatch(r"[0-9a-f]{16}", info.model_version) and info.architecture == "LlamaForSequenceClassification"


def test_a_raising_function_is_invalid_argument_naming_pair_and_function(mixed, reference):
    with RewardClient(mixed.address, mixed.client_config) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.score([("Hi", "fine"), ("Hi", "boom goes the answer")])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("reward function strict (reward_functions_of_the_test:strict) failed on pairs[1]: "
                "ValueError: cannot grade this") in e.value.details()
        (res,) = c.score([("Hi", "fine")]).results  # the server goes on
    assert close(res.components["rm"], reference.score("Hi", "fine"))


def test_http_no_auth_opens_only_the_http_port_with_the_same_mix(mixed, reference):
    tok = reference.tokenizer
    prompt, response = "What is 2+2?", "4, please."
    status, body = post(mixed.http_url, openrlhf_single_turn_body(tok, prompt, response))  # no token
    assert status == 200, body
    values = by_hand(reference, prompt, response)
    assert close(body["rewards"][0], sum(WEIGHTS[k] * v for k, v in values.items()))
    assert body["extra_logs"]["component_polite"] == [1.0] and body["extra_logs"]["component_long"] == [2.0]
    with RewardClient(mixed.address, ClientConfig()) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.score([(prompt, response)])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    log = mixed.log_tail(200)
    assert "WARNING" in log and "--http-no-auth" in log and "NetworkPolicy" in log
    text = urllib.request.urlopen(mixed.metrics_url, timeout=10).read().decode()
    assert 'rlhf_reward_component_value_count{component="polite"}' in text


# ---- reward functions only: no model, no torch ------------------------------------------------------

NO_TORCH = ("import sys\n"
            "for name in ('torch', 'transformers'):\n"
            "    sys.modules[name] = None  # import torch -> ImportError\n"
            "from services.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


def test_rules_only_service_runs_without_torch(tmp_path_factory):
    port, http_port = free_port(), free_port()
    argv = [sys.executable, "-c", NO_TORCH, "serve", "reward", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--http-port", str(http_port), "--reward-function", "fmt=builtin:regex:[A-Z].*\\.",
            "--reward-function", "long=builtin:length:words:3", "--reward-mix", "fmt=1,long=-0.5"]
    log = tmp_path_factory.mktemp("logs") / "rules.log"
    with ChildServer(argv, port=port, service=SERVICE, env={"RLHF_AUTH_TOKEN": ""}, log_path=log,
                     ready_timeout=120) as s, RewardClient(s.address, ClientConfig()) as c:
        good, long = c.score([("Q?", "Fine."), ("Q?", "a b c d e f")]).results
        assert (good.score, dict(good.components)) == (1.0, {"fmt": 1.0, "long": 0.0})
        assert (long.score, dict(long.components)) == (-1.5, {"fmt": 0.0, "long": 3.0})
        for bad, what in [([5, 6, 7], "token ids"), ([{"role": "user", "content": "Q?"}], "messages")]:
            with pytest.raises(grpc.RpcError) as e:
                c.score([(bad, "Fine.")])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{what} need the reward model's tokenizer" in e.value.details()
        info = c.model_info()
        assert [x.name for x in info.components] == ["fmt", "long"] and info.model_name == "" and info.max_length == 0
        assert good.model_version == info.model_version
        with pytest.raises(grpc.RpcError) as e:
            c.load_model("/models/reward")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "reward functions only" in e.value.details()
        status, body = post(f"http://127.0.0.1:{http_port}/get_reward",
                            {"query": ["<|user|>Q?<|assistant|>Fine."], "prompts": ["<|user|>Q?<|assistant|>"]})
        assert status == 200 and body["rewards"] == [1.0], body
    # the interpreter the server ran in could not have imported torch
    blocked = subprocess.run([sys.executable, "-c", NO_TORCH.split("from services")[0] + "import torch\n"],
                             capture_output=True, text=True, timeout=60)
    assert blocked.returncode != 0 and "import of torch halted" in blocked.stderr


@pytest.mark.parametrize("flags, words", [
    (["--reward-function", "fmt"], ["NAME=SPEC"]),
    (["--reward-function", "x=no_such_module_anywhere:f"], ["cannot import no_such_module_anywhere"]),
    (["--reward-function", "x=json:__name__"], ["not a callable"]),
    (["--reward-function", "x=builtin:regex:(["], ["not a valid RE2 regular expression"]),
    (["--reward-function", "x=builtin:regex:(a)\\1"], ["not a valid RE2 regular expression", "backreferences"]),
    (["--reward-function", "x=builtin:length", "--reward-function-timeout-s", "0"], ["--reward-function-timeout-s"]),
    (["--reward-function", "x=builtin:length", "--reward-function-workers", "0"], ["--reward-function-workers"]),
    (["--reward-function", "x=builtin:length", "--reward-mix", "x=1,rm=1"], ["no component named rm"]),
    (["--reward-function", "x=builtin:length", "--reward-function", "y=builtin:length", "--reward-mix", "x=1"],
     ["no weight to y"]),
    ([], ["nothing to score with"]),
    (["--reward-function", "x=builtin:length", "--http-max-concurrency", "0"], ["--http-max-concurrency"]),
])
def test_bad_reward_configuration_exits_2_before_serving(capsys, flags, words):
    from services.cli import main

    assert main(["serve", "reward", "--port", str(free_port()), "--metrics-port", "0", *flags]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
