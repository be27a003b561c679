"""The shared server runtime, exercised through a real `rlhf serve reward` process: auth,
metrics, reflection, TLS/mTLS, size limits, and the health/drain lifecycle."""
from __future__ import annotations

import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command
from services.reward.client import RewardClient

SERVICE = "rlhf.v1.RewardService"
TOKEN = "s3cret-token"
PAIR = reward_pb2.ScorePair(prompt={"text": "How do I prepare for my calculus exam?"},
                            response={"text": "Here is a plan: 1. Review. 2. Practice."})


def reward_server(model_dir, tmp_path, *extra: str, env=None, client_config=None) -> ChildServer:
    port, metrics = free_port(), free_port()
    server = ChildServer(rlhf_command("serve", "reward", "--model", str(model_dir), "--host", "127.0.0.1",
                                      "--port", str(port), "--metrics-port", str(metrics), *extra),
                         port=port, service=SERVICE, env=env, log_path=tmp_path / f"reward-{port}.log",
                         client_config=client_config)
    server.metrics_port = metrics
    return server


@pytest.fixture(scope="module")
def authed(tiny_reward_dir, tmp_path_factory):
    """One server with auth on and a small message limit."""
    with reward_server(tiny_reward_dir, tmp_path_factory.mktemp("authed"), "--max-message-bytes", str(64 << 10),
                       env={"RLHF_AUTH_TOKEN": TOKEN}) as server:
        yield server


def test_health_and_reflection_need_no_token(authed):
    with grpc.insecure_channel(authed.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated(authed, token):
    with RewardClient(authed.address, ClientConfig(auth_token=token)) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.scores([("a question", "an answer")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with RewardClient(authed.address, ClientConfig(auth_token=TOKEN)) as client:
        assert len(client.scores([("a question", "an answer")])) == 1


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_metrics_count_calls_by_code(authed):
    def handled(code: str) -> float:
        for line in _metrics(authed.metrics_port).splitlines():
            if (line.startswith("grpc_server_handled_total{") and 'grpc_method="Score"' in line
                    and f'grpc_code="{code}"' in line):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    ok, unauth, invalid = handled("OK"), handled("UNAUTHENTICATED"), handled("INVALID_ARGUMENT")
    with RewardClient(authed.address, ClientConfig(auth_token=TOKEN)) as client:
        client.scores([("q", "a")])
        with pytest.raises(grpc.RpcError):
            client.scores([])  # empty batch: INVALID_ARGUMENT
    with RewardClient(authed.address, ClientConfig(auth_token="nope")) as client:
        with pytest.raises(grpc.RpcError):
            client.scores([("q", "a")])
    assert (handled("OK"), handled("INVALID_ARGUMENT"), handled("UNAUTHENTICATED")) == (ok + 1, invalid + 1, unauth + 1)
    text = _metrics(authed.metrics_port)
    assert 'grpc_server_started_total{grpc_method="Score",grpc_service="rlhf.v1.RewardService",grpc_type="unary"}' in text
    assert "grpc_server_handling_seconds_bucket{" in text


def test_build_info(authed):
    import re

    text = _metrics(authed.metrics_port)
    [line] = [line for line in text.splitlines() if line.startswith("rlhf_build_info{")]
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    assert line.endswith(" 1.0") and labels["service"] == "reward" and labels["version"]
    assert {"python_version", "grpc_version"} <= set(labels)


def test_message_over_the_limit_is_resource_exhausted_and_server_keeps_serving(authed):
    with RewardClient(authed.address, ClientConfig(auth_token=TOKEN)) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.scores([("q", "x" * (100 << 10))])  # 100 KiB > the 64 KiB limit
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(client.scores([("q", "a")])) == 1


def test_tls_round_trip_and_mtls_refuses_clients_without_a_valid_certificate(tiny_reward_dir, tmp_path, tls_files):
    f = tls_files
    good = ClientConfig(tls_ca=str(f["ca_cert"]), tls_cert=str(f["client_cert"]), tls_key=str(f["client_key"]))
    with reward_server(tiny_reward_dir, tmp_path, "--tls-cert", str(f["server_cert"]), "--tls-key", str(f["server_key"]),
                       "--tls-ca", str(f["ca_cert"]), client_config=good) as server:
        with RewardClient(server.address, good) as client:
            assert len(client.scores([("q", "a")])) == 1
        for config in (ClientConfig(tls_ca=str(f["ca_cert"])),  # no client certificate
                       ClientConfig(tls_ca=str(f["ca_cert"]), tls_cert=str(f["other_client_cert"]),
                                    tls_key=str(f["other_client_key"]))):  # a certificate from another CA
            with RewardClient(server.address, config, timeout=5) as client:
                with pytest.raises(grpc.RpcError) as err:
                    client.scores([("q", "a")])
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with RewardClient(server.address, ClientConfig(), timeout=5) as client:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError):
                client.scores([("q", "a")])


def test_drain_linger_serves_new_rpcs_after_not_serving(tiny_reward_dir, tmp_path):
    """--drain-linger-s: on SIGTERM health turns NOT_SERVING at once, new RPCs are still
    served normally for the linger (load balancers are taking the replica out meanwhile),
    then refused while the server drains and exits 0."""
    linger = 5.0
    server = reward_server(tiny_reward_dir, tmp_path, "--drain-linger-s", str(linger), "--grace-seconds", "10")
    with server:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            stub.Score(reward_pb2.ScoreRequest(pairs=[PAIR]), timeout=30)
            t_sig = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            while health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() - t_sig < linger - 2.0, "health did not turn NOT_SERVING at once"
                time.sleep(0.02)
            served = 0
            while time.monotonic() - t_sig < linger - 1.0:  # well inside the linger
                assert len(stub.Score(reward_pb2.ScoreRequest(pairs=[PAIR]), timeout=30).results) == 1
                served += 1
            assert served >= 3
            refused = None
            while refused is None and time.monotonic() - t_sig < linger + 10:
                try:
                    stub.Score(reward_pb2.ScoreRequest(pairs=[PAIR]), timeout=5)
                except grpc.RpcError as e:
                    refused = (e.code(), time.monotonic() - t_sig)
                time.sleep(0.05)
            assert refused is not None and refused[0] == grpc.StatusCode.UNAVAILABLE
            assert refused[1] >= linger - 0.5, f"refused {refused[1]:.2f} s after SIGTERM, before the {linger} s linger"
        assert server.proc.wait(timeout=30) == 0


def test_health_lifecycle_and_drain_keeps_in_flight_rpc(tiny_reward_dir, tmp_path):
    """NOT_SERVING while loading -> SERVING -> NOT_SERVING on SIGTERM, while an open stream
    accepted before the signal still completes."""
    server = reward_server(tiny_reward_dir, tmp_path, "--grace-seconds", "20")
    server.start()
    try:
        seen: list[int] = []
        channel = grpc.insecure_channel(server.address)
        grpc.channel_ready_future(channel).result(timeout=120)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))

        def follow():
            try:
                for reply in watch:
                    seen.append(reply.status)
            except grpc.RpcError:
                pass
        threading.Thread(target=follow, daemon=True).start()
        server.wait_ready()

        # An in-flight bidirectional stream: one request answered before SIGTERM, one after.
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        requests, go_on = [reward_pb2.ScoreRequest(pairs=[PAIR])], threading.Event()

        def request_stream():
            yield requests[0]
            go_on.wait(30)
            yield reward_pb2.ScoreRequest(pairs=[PAIR, PAIR])

        responses = stub.ScoreStream(request_stream())
        first = next(responses)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while health_pb2.HealthCheckResponse.NOT_SERVING not in seen[1:] and time.monotonic() < deadline:
            time.sleep(0.05)
        # Draining (the open stream holds the drain): a new RPC is refused, the stream is not.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(reward_pb2.ScoreRequest(pairs=[PAIR]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
        go_on.set()
        rest = list(responses)  # the stream completes normally during the drain
        assert len(first.results) == 1 and [len(r.results) for r in rest] == [2]
        watch.cancel()
        # The Watch opened as soon as the port answered, seconds before the model had loaded (the
        # server binds first, then imports torch and loads): it must have seen the loading.
        assert seen[0] == health_pb2.HealthCheckResponse.NOT_SERVING, seen
        serving = seen.index(health_pb2.HealthCheckResponse.SERVING)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen[serving + 1:], seen
        assert server.proc.wait(timeout=30) == 0  # well within its grace
    finally:
        server.kill()
        channel.close()
