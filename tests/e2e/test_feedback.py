"""The feedback service end to end: the real `rlhf serve feedback` over real policy (vLLM CPU) and
reward servers, one set per module. A real headless Chromium (Debian's, driven by Playwright) logs
in and judges by click and by keyboard; the rows are read back from the database; the API examples
of docs/feedback.md are sent as written; limits, metrics, health and the drain are checked."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from ppo_harness import AUTH, ENV, TOKEN, policy_server, reward_server
from services.demo.launch import free_port, rlhf_command
from services.feedback.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = pathlib.Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SYSTEM = "You are a study coach."


def http(method: str, url: str, *, token: str | None = None, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers={
        **({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def add_labeller(db: str, name: str) -> str:
    out = subprocess.run(rlhf_command("feedback", "add-labeller", "--db", db, name), capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def feedback(tiny_policy_dir, tiny_reward_dir, tmp_path_factory):
    """Policy and reward servers and a feedback server over them (conversational prompts), with two
    labellers made by the CLI."""
    from services.demo.data import write_demo_data
    from services.policy.client import PolicyClient
    from services.reward.client import RewardClient

    root = tmp_path_factory.mktemp("feedback")
    data = write_demo_data(root / "data", seed=0, num_sft=10, num_prefs=10, num_prompts=50)
    prompts = root / "chat-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": json.loads(line)["prompt"]}]}) + "\n"
                               for line in data["prompts"].read_text().splitlines()))
    db = f"sqlite:///{root / 'feedback.db'}"
    subprocess.run(rlhf_command("feedback", "migrate", "--db", db), check=True, timeout=120, capture_output=True)
    tokens = {name: add_labeller(db, name) for name in ("ann", "bob", "api")}
    reward = reward_server(tiny_reward_dir, root / "reward.log")
    policy = policy_server(tiny_policy_dir, root)
    port, metrics = free_port(), free_port()
    server = None
    try:
        for s in (reward, policy):
            s.start()
        for s in (reward, policy):
            s.wait_ready()
        proc = subprocess.Popen(
            rlhf_command("serve", "feedback", "--db", db, "--policy", policy.address, "--reward", reward.address,
                         "--prompts", str(prompts), "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                         str(metrics), "--max-tokens", "24", "--overlap", "1.0", "--rate-burst", "40"),
            env={**os.environ, **ENV}, stdout=open(root / "feedback.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        server = proc
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _ready(url):
            assert proc.poll() is None, (root / "feedback.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the feedback server never became ready"
            time.sleep(0.3)
        with PolicyClient(policy.address, AUTH) as pc, RewardClient(reward.address, AUTH) as rc:
            versions = {"policy": pc.model_info().weight_version, "reward": rc.model_info().model_version}
        yield dict(url=url, db=db, tokens=tokens, proc=proc, metrics=metrics, log=root / "feedback.log",
                   versions=versions, root=root)
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            server.wait(60)
        for s in (policy, reward):
            s.terminate()


def _ready(url: str) -> bool:
    try:
        return http("GET", f"{url}/readyz")[0] == 200
    except OSError:  # not listening yet
        return False


# ---- the page, in a real browser ---------------------------------------------------------------

def test_a_person_logs_in_and_judges_by_click_and_by_keyboard(feedback, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, store = feedback["url"], Store(feedback["db"])
    with sync_playwright() as pw:
        # A fresh profile; Playwright passes it to chromium as --user-data-dir.
        browser = pw.chromium.launch_persistent_context(tmp_path / "profile", executable_path=CHROMIUM,
                                                        headless=True, args=CHROMIUM_ARGS,
                                                        viewport={"width": 1200, "height": 760})
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            assert page.url.endswith("/login")  # no session: to the log-in form
            page.fill("#token", "not-a-token")
            page.click("button[type=submit]")
            expect(page.locator(".error")).to_contain_text("Unknown or disabled token")
            page.fill("#token", feedback["tokens"]["ann"])
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/")
            expect(page.locator("#labeller")).to_have_text("ann")

            shown = []

            def current_pair() -> int:
                expect(page.locator("#choose-first")).to_be_enabled(timeout=60_000)
                pair_id = int(page.locator("#pair-id").inner_text())
                shown.append((pair_id, page.locator("#first").inner_text(), page.locator("#second").inner_text()))
                return pair_id

            # By click, then by keyboard: 2 (second), t (tie), s (skip).
            actions = [("click", "#choose-first", "first"), ("key", "2", "second"), ("key", "t", "tie"),
                       ("key", "s", "skip")]
            for n, (how, what, _) in enumerate(actions, start=1):
                pair_id = current_pair()
                if how == "click":
                    page.click(what)
                else:
                    page.keyboard.press(what)
                expect(page.locator("#session-count")).to_have_text(str(n), timeout=60_000)
                assert int(page.locator("#judged").inner_text()) == n
                assert pair_id not in [p for p, *_ in shown[:-1]]
            # The prompt is the conversation, turn by turn, as text.
            current_pair()
            expect(page.locator("#prompt .turn.system")).to_contain_text(SYSTEM)
            page.screenshot(path=str(tmp_path / "feedback-page.png"))
            if os.environ.get("RLHF_SCREENSHOT_DIR"):  # docs/img/feedback-page.png is made this way
                shutil.copy(tmp_path / "feedback-page.png", pathlib.Path(os.environ["RLHF_SCREENSHOT_DIR"]))
            assert (tmp_path / "feedback-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            # A write with the session cookie but without its CSRF token is refused.
            status = page.evaluate("""async () => (await fetch('/api/v1/judgments', {method: 'POST',
                credentials: 'same-origin', headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({pair_id: 1, choice: 'first'})})).status""")
            assert status == 403
        finally:
            browser.close()

    # The rows in the database: the choices in order, with everything a pair must carry.
    ann = store.by_token(feedback["tokens"]["ann"])
    rows = sorted(store.export_rows(), key=lambda r: r["judgment_id"])
    import sqlalchemy as sa
    with store.engine.connect() as c:
        judged = c.execute(sa.text(
            "SELECT j.pair_id, j.choice, j.shown_at, j.judged_at, p.prompt, p.first, p.second, p.policy_version, "
            "p.sampling, p.rm_score_first, p.rm_score_second, p.rm_version FROM judgments j JOIN pairs p "
            "ON p.id = j.pair_id WHERE j.labeller_id = :l AND j.choice IS NOT NULL ORDER BY j.judged_at"),
            {"l": ann.labeller_id}).all()
    assert [r.choice for r in judged] == [choice for *_, choice in actions]
    assert [(r.pair_id, r.first, r.second) for r in judged] == shown[:4]
    for r in judged:
        assert r.policy_version == feedback["versions"]["policy"]
        assert r.rm_version == feedback["versions"]["reward"]
        if r.first.strip() and r.second.strip():
            assert r.rm_score_first is not None and r.rm_score_second is not None
        sampling = json.loads(r.sampling) if isinstance(r.sampling, str) else r.sampling
        assert sampling == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24}
        prompt = json.loads(r.prompt) if isinstance(r.prompt, str) else r.prompt
        assert prompt[0] == {"role": "system", "content": SYSTEM}
        assert r.shown_at <= r.judged_at
    # the export: ann's two decisive choices, as TRL conversational rows
    mine = [r for r in rows if r["labeller"] == "ann"]
    assert [r["pair_id"] for r in mine] == [judged[0].pair_id, judged[1].pair_id]
    assert mine[0]["chosen"] == [{"role": "assistant", "content": judged[0].first}]
    assert mine[1]["chosen"] == [{"role": "assistant", "content": judged[1].second}]
    store.close()


# ---- the API, as docs/feedback.md shows it -----------------------------------------------------

EXAMPLE = re.compile(r"\*\*Request\*\*\s*```bash\n(?P<curl>.*?)\n```\s*\*\*Response\*\* `(?P<status>\d+)`\s*"
                     r"```json\n(?P<body>.*?)\n```", re.S)


def parse_curl(command: str) -> tuple[str, dict, bytes | None, str]:
    argv = shlex.split(command)
    assert argv[0] == "curl"
    method, headers, body, url, i = "GET", {}, None, None, 1
    while i < len(argv):
        a = argv[i]
        if a == "-X":
            method, i = argv[i + 1], i + 1
        elif a == "-H":
            key, _, value = argv[i + 1].partition(": ")
            headers[key], i = value, i + 1
        elif a == "-d":
            body, i = argv[i + 1].encode(), i + 1
        elif not a.startswith("-"):
            url = a
        i += 1
    return method, headers, body, url


def conforms(got, written, key: str = "") -> bool:
    """Whether an answer has the structure of the docs' example: the same keys, and at each leaf a
    value of the same JSON type (numbers alike). A text may be a string or a conversation (the docs
    show strings; this server has conversational prompts); a score or a rate may be null (an empty
    answer is not scored, no pair judged twice has no rate)."""
    if key in ("prompt", "chosen", "rejected"):
        return isinstance(got, str) or (isinstance(got, list) and all(set(m) == {"role", "content"} for m in got))
    if got is None and (key.startswith("rm_") or key == "rate"):
        return True
    if isinstance(written, dict):
        return isinstance(got, dict) and set(got) == set(written) and all(conforms(got[k], written[k], k)
                                                                          for k in written)
    if isinstance(written, bool) or isinstance(got, bool):
        return isinstance(got, bool) and isinstance(written, bool)
    if isinstance(written, (int, float)):
        return isinstance(got, (int, float))
    return type(got) is type(written)


def test_the_api_examples_of_the_docs_hold(feedback):
    """Each request of docs/feedback.md, sent as written (the host, token and pair id replaced),
    answers with the status written and a body of the shape written."""
    doc = (ROOT / "docs" / "feedback.md").read_text()
    examples = list(EXAMPLE.finditer(doc))
    assert len(examples) == 4, "docs/feedback.md: the four API examples are not where this test expects them"
    token, url0 = feedback["tokens"]["api"], feedback["url"]
    # bob judges a pair first, so that some pair is judged once: with --overlap 1.0, `api` is shown one
    # such pair again and its agreement in the answers is a number, as in the docs.
    bob = feedback["tokens"]["bob"]
    bobs = json.loads(http("GET", f"{url0}/api/v1/pair", token=bob)[2])
    assert http("POST", f"{url0}/api/v1/judgments", token=bob, headers={"Content-Type": "application/json"},
                body=json.dumps({"pair_id": bobs["pair_id"], "choice": "first"}).encode())[0] == 201
    pair_id = None
    for example in examples:
        method, headers, body, url = parse_curl(example["curl"].replace("\\\n", " "))
        url = url.replace("http://localhost:8090", feedback["url"])
        headers["Authorization"] = headers["Authorization"].replace("$TOKEN", token).replace("$SERVICE_TOKEN", TOKEN)
        if body is not None:
            written = json.loads(body)
            written["pair_id"] = pair_id
            body = json.dumps(written).encode()
        status, _, answer = http(method, url, body=body, headers=headers)
        assert status == int(example["status"]), (example["curl"], answer)
        expected = [json.loads(line) for line in example["body"].splitlines()]
        got = [json.loads(line) for line in answer.decode().splitlines()]
        assert got and conforms(got[0], expected[0]), (example["curl"], got[0], expected[0])
        if url.endswith("/api/v1/pair"):
            pair_id = got[0]["pair_id"]
        if url.endswith("/api/v1/judgments"):
            assert got[0]["stats"]["agreement"]["compared"] == 1, got[0]


def test_the_client_and_the_limits(feedback):
    from services.feedback.client import FeedbackClient, FeedbackError

    url, token = feedback["url"], feedback["tokens"]["api"]
    fb = FeedbackClient(url, token, retries=0)
    pair = fb.next_pair()
    assert fb.next_pair() == pair  # shown and not judged: the same pair again
    with pytest.raises(FeedbackError) as e:
        fb.judge(pair["pair_id"], "better")
    assert e.value.status == 400 and "choice must be one of" in e.value.message
    assert fb.judge(pair["pair_id"], "second")["stats"]["labeller"] == "api"
    with pytest.raises(FeedbackError) as e:
        fb.judge(pair["pair_id"], "first")
    assert e.value.status == 409
    with pytest.raises(FeedbackError) as e:
        fb.judge(10_000_000, "first")
    assert e.value.status == 404
    with pytest.raises(FeedbackError) as e:
        FeedbackClient(url, "wrong", retries=0).next_pair()
    assert e.value.status == 401
    with pytest.raises(FeedbackError) as e:
        fb.export()  # a labeller's token does not export
    assert e.value.status == 401
    assert len(FeedbackClient(url, TOKEN).export()) == len(Store(feedback["db"]).export_rows())
    status, _, answer = http("POST", f"{url}/api/v1/judgments", token=token, body=b"{" + b" " * 20000 + b"}",
                             headers={"Content-Type": "application/json"})
    assert status == 413 and b"--max-body-bytes=16384" in answer
    # The rate limit: a burst of 40 at 5 a second; what is refused says when to retry.
    codes = [http("GET", f"{url}/api/v1/stats", token=token) for _ in range(60)]
    refused = [h for status, h, _ in codes if status == 429]
    assert refused and all(int(h["Retry-After"]) >= 1 for h in refused)
    assert [status for status, _, _ in codes].count(200) >= 30


def test_metrics_health_and_the_drain(feedback):
    url, store = feedback["url"], Store(feedback["db"])
    assert http("GET", f"{url}/healthz")[0] == 200 and http("GET", f"{url}/readyz")[0] == 200
    text = urllib.request.urlopen(f"http://127.0.0.1:{feedback['metrics']}/metrics", timeout=10).read().decode()

    def value(name: str, **labels) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
        match = re.search(r"^" + pattern + "$", text, re.M)
        assert match, f"{name} {labels} not exported"
        return float(match.group(1))

    judged = {c: n for c, n in _count_choices(store).items()}
    for choice, n in judged.items():
        assert value("rlhf_feedback_judgments_total", choice=choice) == n
    rm = store.rm_agreement(200)
    deadline = time.monotonic() + 30  # the gauge is refreshed just after each judgment
    while abs(value("rlhf_feedback_rm_agreement_judgments") - rm.compared) > 0 and time.monotonic() < deadline:
        time.sleep(1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{feedback['metrics']}/metrics", timeout=10).read().decode()
    assert value("rlhf_feedback_rm_agreement_judgments") == rm.compared > 0
    assert value("rlhf_feedback_rm_agreement_ratio") == pytest.approx(rm.rate)
    assert value("rlhf_feedback_labeller_agreement_comparisons") >= 1
    assert value("rlhf_feedback_policy_version") == feedback["versions"]["policy"]
    assert value("rlhf_feedback_refused_total", reason="rate_limit") >= 1
    assert 'rlhf_build_info{' in text and 'service="feedback"' in text
    store.close()
    # SIGTERM: the server stops cleanly, in time.
    proc = feedback["proc"]
    proc.terminate()
    assert proc.wait(60) == 0, feedback["log"].read_text()[-3000:]


def _count_choices(store: Store) -> dict[str, int]:
    import sqlalchemy as sa
    with store.engine.connect() as c:
        return dict(c.execute(sa.text("SELECT choice, count(*) FROM judgments WHERE choice IS NOT NULL "
                                      "GROUP BY choice")).all())

