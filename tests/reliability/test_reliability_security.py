"""Transport security of a real `rlhf serve reward`: TLS-required servers refuse plaintext,
mTLS refuses a client certificate from another CA (and no certificate), the bearer token
is checked on top of mTLS, --max-message-bytes holds, and what an anonymous or oversized caller
sends is refused before the server reads it (gRPC and the OpenRLHF HTTP port). Reward servers
are cheap; the token checks of every RPC of every service live in the per-service modules."""
from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.demo.launch import free_port, health_status

from reliability_common import REWARD, code_of, mib, raw_unary, record, reward_server, tree_rss

pytestmark = pytest.mark.slow

TOKEN = "security-token"
PAIR = reward_pb2.ScorePair(prompt=common_pb2.TextOrTokens(text="What is 17 times 23?"),
                            response=common_pb2.TextOrTokens(text="391."))
LIMIT = 64 << 10


def score(config: ClientConfig, address: str, request=None) -> grpc.StatusCode:
    with create_channel(address, config) as channel:
        try:
            reward_pb2_grpc.RewardServiceStub(channel).Score(request or reward_pb2.ScoreRequest(pairs=[PAIR]), timeout=15)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


@pytest.fixture(scope="module")
def mtls(tiny_reward_dir, reliability_logs, tls_files):
    """mTLS + token + a 64 KiB message limit + the HTTP endpoint, all on one server."""
    f = tls_files
    good = ClientConfig(auth_token=TOKEN, tls_ca=str(f["ca_cert"]), tls_cert=str(f["client_cert"]),
                        tls_key=str(f["client_key"]))
    http_port = free_port()
    server = reward_server(tiny_reward_dir, reliability_logs, "--tls-cert", str(f["server_cert"]), "--tls-key",
                           str(f["server_key"]), "--tls-ca", str(f["ca_cert"]), "--max-message-bytes", str(LIMIT),
                           "--http-port", str(http_port), env={"RLHF_AUTH_TOKEN": TOKEN}, client_config=good)
    with server:
        server.http_port = http_port
        yield server, good


def test_mtls_refuses_plaintext_foreign_and_missing_certificates(mtls, tls_files, request):
    server, good = mtls
    f = tls_files
    cases = {
        "plaintext": (ClientConfig(auth_token=TOKEN), grpc.StatusCode.UNAVAILABLE),
        "TLS, no client certificate": (ClientConfig(auth_token=TOKEN, tls_ca=str(f["ca_cert"])),
                                       grpc.StatusCode.UNAVAILABLE),
        "client certificate of another CA": (ClientConfig(auth_token=TOKEN, tls_ca=str(f["ca_cert"]),
                                                          tls_cert=str(f["other_client_cert"]),
                                                          tls_key=str(f["other_client_key"])),
                                             grpc.StatusCode.UNAVAILABLE),
        "server checked against another CA": (ClientConfig(auth_token=TOKEN, tls_ca=str(f["other_ca_cert"]),
                                                           tls_cert=str(f["client_cert"]),
                                                           tls_key=str(f["client_key"])),
                                              grpc.StatusCode.UNAVAILABLE),
        "good certificate, no token": (ClientConfig(tls_ca=str(f["ca_cert"]), tls_cert=str(f["client_cert"]),
                                                    tls_key=str(f["client_key"])), grpc.StatusCode.UNAUTHENTICATED),
        "good certificate, wrong token": (ClientConfig(auth_token="nope", tls_ca=str(f["ca_cert"]),
                                                       tls_cert=str(f["client_cert"]), tls_key=str(f["client_key"])),
                                          grpc.StatusCode.UNAUTHENTICATED),
        "good certificate and token": (good, grpc.StatusCode.OK),
    }
    got = {name: score(config, server.address) for name, (config, _) in cases.items()}
    assert got == {name: want for name, (_, want) in cases.items()}
    record(request, "mTLS + token: plaintext, no cert, foreign-CA cert, wrong CA, no/wrong token",
           cases=len(cases), faults=len(cases) - 1,
           errors=", ".join(f"{k}: {v.name}" for k, v in got.items()), result="pass")


def test_message_size_limit_holds(mtls, request):
    server, good = mtls
    big = reward_pb2.ScoreRequest(pairs=[reward_pb2.ScorePair(prompt=common_pb2.TextOrTokens(text="x" * (LIMIT + 1)),
                                                              response=PAIR.response)])
    just_under = reward_pb2.ScoreRequest(pairs=[PAIR] * 200)
    assert just_under.ByteSize() < LIMIT
    codes = [score(good, server.address, big) for _ in range(5)]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
    assert score(good, server.address, just_under) in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
    assert score(good, server.address) == grpc.StatusCode.OK
    assert health_status(server.address, REWARD, good) == 1
    record(request, f"--max-message-bytes {LIMIT}: requests over it", cases=7, faults=5,
           errors="5 oversized -> RESOURCE_EXHAUSTED; under-limit and normal requests answered", result="pass")


def test_tls_server_refuses_plaintext(tiny_reward_dir, reliability_logs, tls_files, request):
    f = tls_files
    tls = ClientConfig(tls_ca=str(f["ca_cert"]))
    with reward_server(tiny_reward_dir, reliability_logs, "--tls-cert", str(f["server_cert"]), "--tls-key",
                       str(f["server_key"]), client_config=tls) as server:
        plain = score(ClientConfig(), server.address)
        secure = score(tls, server.address)
    assert (plain, secure) == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK)
    record(request, "TLS-only server: plaintext client", cases=2, faults=1,
           errors="plaintext -> UNAVAILABLE, TLS -> OK", result="pass")


def test_http_endpoint_of_a_tls_server_is_not_plaintext(mtls, tls_files, request):
    """With --tls-cert the gRPC port refuses plaintext; the OpenRLHF HTTP port of the same
    server must not take the bearer token in clear text either. It does listen, and answers
    HTTPS: a refused connection (nothing listening) must not pass for a refusal of plaintext."""
    import http.client
    import ssl

    server, _ = mtls

    def post(scheme: str, context=None):
        req = urllib.request.Request(f"{scheme}://127.0.0.1:{server.http_port}/get_reward", method="POST",
                                     data=b'{"query": ["a b"], "prompts": ["a"]}',
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert post("https", ssl.create_default_context(cafile=str(tls_files["ca_cert"]))) == 200
    try:
        outcome = f"plaintext HTTP answered {post('http')}"
    except urllib.error.URLError as e:
        outcome = e.reason if isinstance(e.reason, Exception) else e
    except (http.client.HTTPException, ConnectionError, OSError) as e:
        outcome = e
    refused = isinstance(outcome, (http.client.HTTPException, ConnectionResetError, ssl.SSLError)) or (
        isinstance(outcome, OSError) and not isinstance(outcome, ConnectionRefusedError))
    record(request, "TLS server's HTTP /get_reward over plaintext", cases=2, faults=1,
           errors=f"HTTPS answered 200; plaintext: {type(outcome).__name__} {outcome}"[:200],
           result="pass" if refused else "FAIL: the token and scores travel in clear text")
    assert refused, outcome


# ---- memory before authentication and limits (issue 13.4) -------------------------------------------

FLOOD, FLOOD_BYTES = 16, 60 << 20
RSS_BOUND = 128 << 20  # growth allowed while 16 x 60 MB are refused: an eighth of what they carry


class PeakRss:
    """The peak RSS of a server's process tree, sampled every 20 ms while the block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(0.02)

    def __enter__(self):
        time.sleep(0.5)
        self.before = tree_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.5)
        self._stop.set()
        self._thread.join()
        self.after = tree_rss(self.pid)

    @property
    def growth(self) -> int:
        return max(self.peak, self.after) - self.before

    def __str__(self):
        return f"before {mib(self.before)}, peak {mib(self.peak)}, after {mib(self.after)} (+{mib(self.growth)})"


@pytest.fixture(scope="module")
def guarded(tiny_reward_dir, reliability_logs):
    """Auth on, default --max-message-bytes (64 MiB), the HTTP port with 4 requests at once."""
    http_port = free_port()
    server = reward_server(tiny_reward_dir, reliability_logs, "--http-port", str(http_port),
                           "--http-max-concurrency", "4", env={"RLHF_AUTH_TOKEN": TOKEN},
                           client_config=ClientConfig(auth_token=TOKEN))
    with server:
        server.http_port = http_port
        yield server


def test_unauthenticated_flood_is_refused_before_it_is_read(guarded, request):
    """16 concurrent unauthenticated 60 MB Score requests: all UNAUTHENTICATED, and the server never
    holds their bytes (before the fix: RSS 526 -> 2040 MiB peak, 1288 MiB kept)."""
    data = reward_pb2.ScoreRequest(pairs=[reward_pb2.ScorePair(prompt=common_pb2.TextOrTokens(text="x" * FLOOD_BYTES),
                                                               response=PAIR.response)]).SerializeToString()
    with PeakRss(guarded.pid) as rss, create_channel(guarded.address, ClientConfig()) as channel:
        call = raw_unary(channel, REWARD, "Score")
        futures = [call.future(data, timeout=120) for _ in range(FLOOD)]
        codes = [code_of(f)[0] for f in futures]
    del data
    good = ClientConfig(auth_token=TOKEN)
    record(request, f"Unauthenticated flood: {FLOOD} concurrent Score of {mib(FLOOD_BYTES)}, no token",
           cases=FLOOD, faults=FLOOD, errors=f"{codes.count(grpc.StatusCode.UNAUTHENTICATED)} UNAUTHENTICATED",
           memory=f"{rss}; bound +{mib(RSS_BOUND)} for {mib(FLOOD * FLOOD_BYTES)} sent",
           result="pass" if set(codes) == {grpc.StatusCode.UNAUTHENTICATED} and rss.growth < RSS_BOUND else "FAIL")
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * FLOOD
    assert rss.growth < RSS_BOUND, str(rss)
    assert score(good, guarded.address) == grpc.StatusCode.OK


def _http(port: int, headers: dict, body: bytes = b"", length: int | None = None, send: int | None = None,
          ) -> tuple[int, bytes]:
    """A POST /get_reward on a raw socket: Content-Length `length` (default len(body)), the first
    `send` bytes of the body (default all). Returns the status and the response body. The server may
    answer (and stop reading) before the body is sent: what it does with an unread body is the point."""
    length = len(body) if length is None else length
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "x", "Content-Type": "application/json",
                                                       "Content-Length": str(length), **headers}.items())
        s.sendall(f"POST /get_reward HTTP/1.1\r\n{head}\r\n".encode())
        try:
            s.sendall(memoryview(body)[:send])
        except OSError:
            pass  # the server closed after answering: read its answer
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        head, _, rest = reply.partition(b"\r\n\r\n")
        size = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), b"0"))
        while len(rest) < size:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(head.split(b" ")[1]), rest


def test_http_bodies_are_refused_before_they_are_read(guarded, request):
    """The OpenRLHF port: 16 concurrent 60 MB bodies without a token get 401, 16 over
    --max-message-bytes get 413, both without the server holding their bytes."""
    big = b'{"query": ["' + b"x" * FLOOD_BYTES + b'"]}'
    auth = {"Authorization": f"Bearer {TOKEN}"}
    pool = concurrent.futures.ThreadPoolExecutor(FLOOD)
    with PeakRss(guarded.pid) as anonymous:
        unauth = list(pool.map(lambda _: _http(guarded.http_port, {}, big)[0], range(FLOOD)))
    over = (64 << 20) + 1  # the default --max-message-bytes, plus one
    oversized = big + b" " * (over - len(big))
    with PeakRss(guarded.pid) as too_big:
        t0 = time.monotonic()
        codes = list(pool.map(lambda _: _http(guarded.http_port, auth, oversized)[0], range(FLOOD)))
        seconds = time.monotonic() - t0
    pool.shutdown()
    status, body = _http(guarded.http_port, auth, b'{"query": ["<|user|>Hi<|assistant|>Hello"]}')
    record(request, f"HTTP: {FLOOD} concurrent {mib(FLOOD_BYTES)} bodies without a token, {FLOOD} over "
                    f"--max-message-bytes with it", cases=2 * FLOOD + 1, faults=2 * FLOOD,
           errors=f"no token: {sorted(set(unauth))}; over the limit: {sorted(set(codes))} in {seconds:.1f} s; "
                  f"then a normal request: {status}",
           memory=f"no token: {anonymous}; over the limit: {too_big}; bound +{mib(RSS_BOUND)} each",
           result="pass" if (set(unauth), set(codes), status) == ({401}, {413}, 200)
           and max(anonymous.growth, too_big.growth) < RSS_BOUND else "FAIL")
    assert unauth == [401] * FLOOD and codes == [413] * FLOOD
    assert anonymous.growth < RSS_BOUND, str(anonymous)
    assert too_big.growth < RSS_BOUND, str(too_big)
    assert status == 200, body


def test_http_concurrency_limit_answers_429_at_once(guarded, request):
    """--http-max-concurrency 4: four requests whose bodies trickle in hold the four places; twelve
    more get 429 at once; the four then finish normally."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = b'{"query": ["<|user|>Hi<|assistant|>Hello"]}'
    holders = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", guarded.http_port), timeout=60)
        s.sendall(f"POST /get_reward HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        holders.append(s)
    time.sleep(1.0)  # the server is now reading four bodies
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        refused = list(pool.map(lambda _: _http(guarded.http_port, auth, body), range(12)))
    seconds = time.monotonic() - t0
    finished = []
    for s in holders:
        with s:
            s.sendall(body[5:])
            finished.append(int(s.recv(65536).split(b" ")[1]))
    codes = [c for c, _ in refused]
    record(request, "HTTP --http-max-concurrency 4: 12 requests beyond 4 slow ones", cases=16, faults=12,
           errors=f"beyond: {sorted(set(codes))} in {seconds:.2f} s; the four: {finished}",
           result="pass" if codes == [429] * 12 and finished == [200] * 4 else "FAIL")
    assert codes == [429] * 12 and all(b"--http-max-concurrency=4" in r for _, r in refused)
    assert seconds < 10
    assert finished == [200] * 4
