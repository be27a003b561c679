"""LoadModel: a new reward model version swapped into a running `rlhf serve reward`, real server,
real models (two tiny reward models of different weights and score statistics, and models that do
not fit), under concurrent Score, ScoreStream, Compare and HTTP load (issue 25, item 3).

The reference for every score is the model that the result says scored it, loaded here with
transformers and run on one pair at a time."""
from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import threading
import time
import urllib.request

import grpc
import pytest

from services.common.config import ClientConfig
from services.common.text import format_prompt
from services.demo.launch import health_status
from services.reward.client import AsyncRewardClient, RewardClient
from services.reward.served import weights_version

from test_reward_service import PAIRS, SERVICE, _serve, post

TOKEN, ADMIN = "scoring-token", "admin-token"
SCORING, ADMINISTRATION = ClientConfig(auth_token=TOKEN), ClientConfig(auth_token=ADMIN)
MAX_LENGTH = 64
META = {"a": {"score_mean": 0.5, "score_std": 2.0, "eval_accuracy": 0.6},
        "b": {"score_mean": -1.0, "score_std": 4.0, "eval_accuracy": 0.7}}


@pytest.fixture(scope="module")
def root(tiny_reward_dir, tmp_path_factory):
    """The server's --model-root, holding model a (the one served at start), b (other weights and
    statistics, the same tokenizer and architecture) and the models that must be refused; and a
    copy of b outside it."""
    import torch
    import transformers

    from services.demo.tiny_model import build_model, build_tokenizer

    base = tmp_path_factory.mktemp("swap")
    root, outside = base / "models", base / "elsewhere"
    shutil.copytree(tiny_reward_dir, root / "a")
    build_model("reward", root / "b", seed=1)
    for name, meta in META.items():
        (root / name / "reward_meta.json").write_text(json.dumps(meta))
    shutil.copytree(root / "b", outside / "b")
    # another tokenizer (trained on another corpus seed: the same size, other ids)
    shutil.copytree(root / "b", root / "other-tokenizer")
    build_tokenizer(1).save_pretrained(root / "other-tokenizer")
    # two labels
    config = transformers.AutoConfig.from_pretrained(root / "b", num_labels=2)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "two-labels")
    transformers.AutoTokenizer.from_pretrained(root / "b").save_pretrained(root / "two-labels")
    build_model("reward", root / "qwen2", arch="qwen2", seed=1)
    build_model("reward", root / "short", seed=1, max_position=32)
    shutil.copytree(root / "b", root / "corrupt")
    weights = root / "corrupt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header
    weights.write_bytes(bytes(data))
    (root / "link").symlink_to(outside / "b")  # inside by name, outside in fact
    shutil.copytree(root / "b", root / "file-link")
    (root / "file-link" / "model.safetensors").unlink()
    (root / "file-link" / "model.safetensors").symlink_to(outside / "b" / "model.safetensors")
    return root


class Scores(dict):
    """(prompt, response) -> the model's score of the pair alone, computed when first asked."""

    def __init__(self, model, tok):
        super().__init__()
        self.model, self.tok = model, tok

    def __missing__(self, pair):
        import torch

        p, r = pair
        tok = self.tok
        ids = tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] + \
            tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            self[pair] = self.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        return self[pair]


@pytest.fixture(scope="module")
def reference(root):
    """By version: each model's name, statistics and scores (by transformers, one pair at a time)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "a")
    out = {}
    for name in ("a", "b"):
        model = AutoModelForSequenceClassification.from_pretrained(root / name, dtype=torch.float32).eval()
        out[weights_version(root / name)] = dict(name=name, scores=Scores(model, tok), **META[name])
    a, b = out.values()
    for pair in PAIRS:  # the two models must tell apart at the test's tolerance
        assert abs(a["scores"][pair] - b["scores"][pair]) > 1e-2, pair
    return out


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    admin_file = tmp_path_factory.mktemp("admin") / "token"
    admin_file.write_text(ADMIN + "\n")
    with _serve(root / "a", tmp_path_factory, "--model-root", str(root), "--admin-token-file", str(admin_file),
                "--max-length", str(MAX_LENGTH), env={"RLHF_AUTH_TOKEN": TOKEN}) as s:
        yield s


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)


def metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def check_result(reference, version, pair, res, normalize) -> None:
    """A result is its version's model's score of the pair (normalized with that version's statistics)."""
    ref = reference[version]
    want = ref["scores"][pair]
    assert close(res.raw_score, want), (ref["name"], pair, res.raw_score, want)
    if normalize:
        assert close(res.score, (want - ref["score_mean"]) / ref["score_std"]), (ref["name"], pair, res.score)


def test_hot_swap_under_load_loses_nothing_and_every_result_names_its_version(server, root, reference):
    """16 Score clients (some normalize), a ScoreStream, Compare and HTTP clients run while the
    model is swapped a -> b -> a -> b. No request fails; every result names the version that
    scored it and equals that model's score; requests sent after a LoadModel answered are scored
    by the new model, those answered before it was called by the old; health says SERVING all
    along."""
    va, vb = weights_version(root / "a"), weights_version(root / "b")
    plan = [("b", vb), ("a", va), ("b", vb)]
    records, swaps, done = [], [], threading.Event()
    health = []

    def watch_health():
        while not done.is_set():
            health.append(health_status(server.address, SERVICE, SCORING, timeout=10.0))
            time.sleep(0.05)

    async def scoring(i: int, c: AsyncRewardClient):
        k = 0
        while not done.is_set():
            batch = [PAIRS[(i + k + j) % len(PAIRS)] for j in range(1 + (i + k) % 3)]
            normalize = (i + k) % 2 == 0
            t0 = time.monotonic()
            reply = await c.score(batch, normalize=normalize)
            records.append(("score", t0, time.monotonic(), (batch, normalize), reply))
            k += 1

    async def streaming(c: AsyncRewardClient):
        while not done.is_set():
            batches = [[PAIRS[j % len(PAIRS)]] for j in range(8)]
            t0 = time.monotonic()
            async for reply in c.score_stream(batches):
                records.append(("stream", t0, time.monotonic(), ([PAIRS[int(reply.request_id) % len(PAIRS)]], False),
                                reply))

    async def comparing(c: AsyncRewardClient):
        k = 0
        while not done.is_set():
            (p, first), (_, second) = PAIRS[k % len(PAIRS)], PAIRS[(k + 1) % len(PAIRS)]
            t0 = time.monotonic()
            reply = await c.compare(p, first, second)
            records.append(("compare", t0, time.monotonic(), ((p, first), (p, second)), reply))
            k += 1

    def http_client():
        tok_prompt = "<|user|>{}<|assistant|>"
        while not done.is_set():
            t0 = time.monotonic()
            status, body = post(server.http_url, {"query": [tok_prompt.format(p) + r + "<|eos|>" for p, r in PAIRS[:2]]},
                                TOKEN)
            records.append(("http", t0, time.monotonic(), PAIRS[:2], (status, body)))

    async def answered(n: int):  # at least n more requests answered (a loaded machine is slow to start them)
        goal = len(records) + n
        while len(records) < goal:
            await asyncio.sleep(0.05)

    async def swapper():
        async with AsyncRewardClient(server.address, ADMINISTRATION) as c:
            await answered(30)
            for name, version in plan:
                t0 = time.monotonic()
                reply = await c.load_model(str(root / name))
                swaps.append((t0, time.monotonic(), version, reply))
                await answered(30)
        done.set()

    async def main():
        async with AsyncRewardClient(server.address, SCORING) as c:
            await asyncio.gather(swapper(), *(scoring(i, c) for i in range(16)), streaming(c), comparing(c),
                                 asyncio.to_thread(http_client), asyncio.to_thread(watch_health))

    asyncio.run(main())

    # LoadModel said what it did
    previous = va
    for _, _, version, reply in swaps:
        assert (reply.model_version, reply.previous_version, reply.weights_version, reply.changed) == \
            (version, previous, version, True)
        assert reply.load_seconds > 0 and reply.model_path.startswith(str(root))
        previous = version
    # every result: its version's score; one version per response
    versions_seen = {va: 0, vb: 0}
    for kind, _, _, request, reply in records:
        if kind == "http":
            status, body = reply
            assert status == 200, body
            version = body["model_version"]
            assert body["extra_logs"]["model_version_id"] == [float(int(version[:6], 16))] * 2
            for pair, got in zip(request, body["rewards"]):
                assert close(got, reference[version]["scores"][pair]), (reference[version]["name"], pair)
        elif kind == "compare":
            version = reply.model_version
            (p, first), (_, second) = request
            assert close(reply.first_score, reference[version]["scores"][(p, first)])
            assert close(reply.second_score, reference[version]["scores"][(p, second)])
        else:
            version = reply.model_version
            batch, normalize = request
            assert [r.model_version for r in reply.results] == [version] * len(batch)
            for pair, res in zip(batch, reply.results):
                check_result(reference, version, pair, res, normalize)
        versions_seen[version] += 1
    # the order: answered before a LoadModel was called -> the version before it; sent after it
    # answered (and answered before the next one was called) -> its version
    edges = [(0.0, 0.0, va)] + [(t0, t1, v) for t0, t1, v, _ in swaps] + [(math.inf, math.inf, None)]
    windows = {k: 0 for k in range(len(swaps) + 1)}
    for kind, sent, answered, _, reply in records:
        version = reply[1]["model_version"] if kind == "http" else reply.model_version
        for k in range(len(edges) - 1):
            if sent > edges[k][1] and answered < edges[k + 1][0]:
                assert version == edges[k][2], (kind, k, version)
                windows[k] += 1
    assert all(n > 0 for n in windows.values()), windows  # every window had requests: the check checked
    assert versions_seen[va] > 0 and versions_seen[vb] > 0
    lost = [r for r in records if r[0] == "http" and r[4][0] != 200]
    print(f"{len(records)} requests during {len(swaps)} swaps, 0 failed; by version {versions_seen}; "
          f"per window {windows}; health checks {len(health)}")
    assert not lost and health and set(health) == {1}  # SERVING at every check

    with RewardClient(server.address, SCORING) as c:
        info = c.model_info()
    assert (info.model_version, info.weights_version, info.model_path) == (vb, vb, str(root / "b"))
    assert (info.score_mean, info.score_std) == (pytest.approx(-1.0), pytest.approx(4.0))
    assert info.eval_accuracy == pytest.approx(0.7) and list(info.model_roots) == [str(root)]
    assert info.loaded_at > time.time() - 600
    assert metric(server, "rlhf_reward_model_info", model_version=vb) == 1.0
    assert metric(server, "rlhf_reward_model_info", model_version=va) == 0.0
    assert metric(server, "rlhf_reward_model_loads_total", result="swapped") == 3
    log = server.log_tail(1_000_000)
    assert log.count(f"reward model version {va} released") >= 1 and f"reward model version {vb} released" in log


REFUSED = [
    # (model_path under the root, or as given when it starts with "/" or is relative, code, words)
    ("other-tokenizer", "FAILED_PRECONDITION", ["does not fit the one served", "tokenizer:", "map to other ids"]),
    ("two-labels", "FAILED_PRECONDITION", ["a reward model has one label", "num_labels=2"]),
    ("qwen2", "FAILED_PRECONDITION", ["architecture Qwen2ForSequenceClassification",
                                      "served: LlamaForSequenceClassification"]),
    ("short", "FAILED_PRECONDITION", ["max length 32 tokens (served: 64"]),
    ("corrupt", "FAILED_PRECONDITION", ["cannot load the reward model in", "corrupt"]),
    ("nowhere", "NOT_FOUND", ["is not a directory"]),
    ("link", "PERMISSION_DENIED", ["is outside the directories this server loads models from", "--model-root"]),
    ("file-link", "PERMISSION_DENIED", ["model.safetensors links to outside --model-root"]),
    ("{root}/../elsewhere/b", "PERMISSION_DENIED", ["must not contain '..'"]),
    ("{outside}", "PERMISSION_DENIED", ["is outside the directories"]),
    ("b", "INVALID_ARGUMENT", ["must be an absolute path"]),
    ("", "INVALID_ARGUMENT", ["model_path must not be empty"]),
    ("/x\x00y", "INVALID_ARGUMENT", ["without NUL"]),
]


def test_a_model_that_does_not_fit_or_a_bad_path_is_refused_and_the_old_one_keeps_serving(server, root, reference):
    """Each refused with its code and a message saying what differs; the version, the scores and
    GetModelInfo stay those of the served model after every refusal."""
    with RewardClient(server.address, SCORING) as c:
        served = c.model_info().model_version
    before = {r: metric(server, "rlhf_reward_model_loads_total", result=r) for r in ("refused", "failed")}
    outcomes = []
    with RewardClient(server.address, ADMINISTRATION) as admin, RewardClient(server.address, SCORING) as c:
        for path, code, words in REFUSED:
            if path.startswith("{"):
                path = path.format(root=root, outside=root.parent / "elsewhere" / "b")
            elif path and path != "b" and not path.startswith("/"):
                path = str(root / path)
            with pytest.raises(grpc.RpcError) as e:
                admin.load_model(path)
            outcomes.append((path, e.value.code().name, e.value.details()))
            assert e.value.code().name == code, (path, e.value.details())
            details = e.value.details()
            for w in words:
                assert w in details, (path, w, details)
            reply = c.score(PAIRS[:2])
            assert reply.model_version == served
            for pair, res in zip(PAIRS[:2], reply.results):
                check_result(reference, served, pair, res, False)
            assert c.model_info().model_version == served
        # the version checks
        b = weights_version(root / "b")
        other = "a" if reference[served]["name"] == "b" else "b"
        for kw, words in [(dict(expected_weights_version="0" * 16), ["not expected_weights_version 0000", "written"]),
                          (dict(if_version="f" * 16), [f"if_version is {'f' * 16}, but this service serves version "
                                                        f"{served}"])]:
            with pytest.raises(grpc.RpcError) as e:
                admin.load_model(str(root / other), **kw)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            for w in words:
                assert w in e.value.details(), (w, e.value.details())
        # the served weights again: nothing loaded, said so
        again = admin.load_model(str(root / reference[served]["name"]))
        assert (again.changed, again.model_version, again.previous_version) == (False, served, served)
        # auth: the scoring token may score, not swap; none may do neither; the admin token both
        with pytest.raises(grpc.RpcError) as e:
            c.load_model(str(root / other))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin token" in e.value.details()
        with RewardClient(server.address, ClientConfig()) as anonymous:
            with pytest.raises(grpc.RpcError) as e:
                anonymous.load_model(str(root / other))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "admin token" in e.value.details()
        assert admin.score(PAIRS[:1]).model_version == served
        assert c.model_info().model_version == served
        # and a good one with both checks passes
        swapped = admin.load_model(str(root / other), expected_weights_version=weights_version(root / other),
                                   if_version=served)
        assert swapped.changed and swapped.model_version == weights_version(root / other) != served
        assert b in (served, swapped.model_version)
    assert metric(server, "rlhf_reward_model_loads_total", result="failed") == before["failed"] + 1  # corrupt
    assert metric(server, "rlhf_reward_model_loads_total", result="refused") == \
        before["refused"] + len(REFUSED) - 1 + 2
    for path, code, details in outcomes:
        print(f"{code:20s} {path!r}: {details[:160]}")


def test_the_cli_swaps_every_replica_and_says_what_each_serves(server, root, tmp_path, capsys):
    """`rlhf reward load-model PATH --reward ADDRESS`: exit 0 and one line per replica; a refusal
    exits 1 with the status and its message."""
    from services.cli import main

    admin_file = tmp_path / "admin"
    admin_file.write_text(ADMIN)
    with RewardClient(server.address, SCORING) as c:
        served = c.model_info()
    other = "a" if served.model_path.endswith("/b") else "b"
    flags = ["--reward", server.address, "--client-auth-token-file", str(admin_file)]
    assert main(["reward", "load-model", str(root / other), *flags]) == 0
    out = capsys.readouterr().out
    assert f"{server.address}: now serves {weights_version(root / other)}" in out and served.model_version in out
    assert main(["reward", "load-model", str(root / "qwen2"), *flags]) == 1
    assert "FAILED_PRECONDITION: the model in" in capsys.readouterr().err


def test_concurrent_loads_are_served_one_after_the_other(server, root):
    """Two LoadModel calls at once: one waits for the other, then loads (its previous version is
    the other's); the same directory twice at once: loaded once, the other call says it was
    already served."""
    async def main():
        async with AsyncRewardClient(server.address, ADMINISTRATION) as c:
            before = await c.model_info()
            together = await asyncio.gather(c.load_model(str(root / "a")), c.load_model(str(root / "b")))
            middle = await c.model_info()
            other = str(root / ("a" if middle.model_path.endswith("/b") else "b"))
            same = await asyncio.gather(c.load_model(other), c.load_model(other))
            return before, together, middle, same, await c.model_info()

    before, together, middle, same, after = asyncio.run(main())
    earlier, later = sorted(together, key=lambda r: r.previous_version != before.model_version)
    assert earlier.previous_version == before.model_version and later.previous_version == earlier.model_version
    assert middle.model_version == later.model_version and later.changed
    assert sorted(r.changed for r in same) == [False, True]
    assert {r.model_version for r in same} == {after.model_version} and after.model_version != middle.model_version
