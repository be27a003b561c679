"""Transport security of a real `rlhf serve reward`: TLS-required servers refuse plaintext,
mTLS refuses a client certificate from another CA (and no certificate), the bearer token
is checked on top of mTLS, and --max-message-bytes holds. Reward servers are cheap; the
token checks of every RPC of every service live in the per-service modules."""
from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import pytest

from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.demo.launch import free_port, health_status

from reliability_common import REWARD, record, reward_server

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


def test_http_endpoint_of_a_tls_server_is_not_plaintext(mtls, request):
    """With --tls-cert the gRPC port refuses plaintext; the OpenRLHF HTTP port of the same
    server must not take the bearer token in clear text either."""
    server, _ = mtls
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/get_reward", method="POST",
                                 data=b'{"query": ["a b"], "prompts": ["a"]}',
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, ConnectionError, OSError):
        status = None  # refused: what we want
    record(request, "TLS server's HTTP /get_reward over plaintext", cases=1, faults=1,
           errors=f"plaintext HTTP answered {status}" if status else "refused",
           result="pass" if status is None else "FAIL: the token and scores travel in clear text")
    assert status is None, f"plaintext HTTP with the bearer token was answered {status}"
