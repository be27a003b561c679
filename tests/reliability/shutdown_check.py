"""SIGTERM while loaded, for any of our servers: accepted requests complete, new ones get
UNAVAILABLE, health turns NOT_SERVING first, the process exits within its grace period.

Two kinds of clients: ones that keep calling one address whatever health says, and
(`leave_after_s`) ones behind a load balancer, which stop sending that long after
NOT_SERVING, as a Kubernetes Service does once its endpoints drop the pod. With
`--drain-linger-s` longer than that, the second kind never sees a refusal."""
from __future__ import annotations

import signal
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.common.channel import create_channel

RACE_S = 0.05     # a request sent this close to the signal may land on either side of it
SETTLE_S = 0.5    # after this, the server must refuse new requests
ORDER_SLACK_S = 0.25  # client threads on 2 busy cores see the Watch message and a refusal this far apart


def _request(kind: str):
    if kind == "reward":
        req = reward_pb2.ScoreRequest(pairs=[reward_pb2.ScorePair(
            prompt=common_pb2.TextOrTokens(text=f"Question number {i}?"),
            response=common_pb2.TextOrTokens(text="An answer that takes a few tokens.")) for i in range(4)])
        return (lambda ch: reward_pb2_grpc.RewardServiceStub(ch).Score), req, lambda r: len(r.results) == 4
    req = policy_pb2.GenerateRequest(prompts=[common_pb2.TextOrTokens(text="Tell me a story.")],
                                     params=policy_pb2.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    return (lambda ch: policy_pb2_grpc.PolicyServiceStub(ch).Generate), req, \
        lambda r: len(r.results[0].completions[0].token_ids) == 16


def sigterm_under_load(server, service: str, config, kind: str, *, grace: float, clients: int = 32,
                       load_s: float = 3.0, linger: float = 0.0,
                       leave_after_s: float | None = None) -> tuple[dict, list[str]]:
    """(row of the figures table, with the status codes counted under "codes"; the checks
    that failed). `linger`: the server's --drain-linger-s."""
    method, req, valid = _request(kind)
    channels = [create_channel(server.address, config) for _ in range(4)]  # no retry policy: see every refusal
    calls = [method(c) for c in channels]
    log: list[tuple[float, float, str, bool]] = []  # (start, end, code, answer valid)
    odd_details: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    gone = threading.Event()  # the load balancer has taken the server out: no new requests

    def client(i: int) -> None:
        call = calls[i % len(calls)]
        while not stop.is_set() and not gone.is_set():
            t0 = time.monotonic()
            try:
                ok = valid(call(req, timeout=120))
                code = "OK"
            except grpc.RpcError as e:
                code, ok = e.code().name, False
                if code != "UNAVAILABLE":
                    odd_details.setdefault(code, e.details() or "")
            with lock:
                log.append((t0, time.monotonic(), code, ok))
            if code != "OK":
                time.sleep(0.01)

    health_events: list[tuple[float, int]] = []
    watch_error: list[str] = []
    watch_channel = create_channel(server.address, config)
    watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(service=service))

    def watcher() -> None:
        try:
            for msg in watch:
                health_events.append((time.monotonic(), msg.status))
                if msg.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    if leave_after_s is not None:
                        threading.Timer(leave_after_s, gone.set).start()
                    watch.cancel()  # an open Watch would hold the drain for the whole grace period
                    return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                watch_error.append(f"{e.code().name}: {e.details()}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    wt = threading.Thread(target=watcher, daemon=True)
    wt.start()
    for t in threads:
        t.start()
    time.sleep(load_s)
    t_sig = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(grace + 60)
    except Exception:  # noqa: BLE001
        pass
    t_exit = time.monotonic()
    exit_code = server.proc.poll()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(130)
    wt.join(5)
    for c in channels + [watch_channel]:
        c.close()

    odd = [f"{e[2]} sent {e[0] - t_sig:+.2f} s, ended {e[1] - t_sig:+.2f} s" for e in log if e[2] not in ("OK", "UNAVAILABLE")]
    before = [e for e in log if e[0] < t_sig - RACE_S]
    after = [e for e in log if e[0] > t_sig + linger + SETTLE_S]
    lost = [e for e in before if e[2] != "OK" or not e[3]]
    accepted_late = [e for e in after if e[2] == "OK"]
    codes: dict[str, int] = {}
    for e in log:
        codes[e[2]] = codes.get(e[2], 0) + 1
    not_serving = next((t for t, s in health_events if s == health_pb2.HealthCheckResponse.NOT_SERVING), None)
    first_refusal = min((e[1] for e in log if e[2] == "UNAVAILABLE" and e[0] >= t_sig - RACE_S), default=None)
    in_flight_at_sig = sum(1 for e in log if e[0] < t_sig < e[1])
    exit_s = t_exit - t_sig
    checks = {
        "accepted requests all completed": not lost,
        "only OK and UNAVAILABLE": set(codes) <= {"OK", "UNAVAILABLE"},
        # (clients behind a load balancer have left by then)
        "new requests refused with UNAVAILABLE": not accepted_late and (bool(after) or leave_after_s is not None),
        "health NOT_SERVING before the first refusal": not_serving is not None and (
            first_refusal is None or not_serving <= first_refusal + ORDER_SLACK_S),
        "exited 0 within the linger and grace period": exit_code == 0 and exit_s <= linger + grace,
        "in-flight requests at SIGTERM": in_flight_at_sig > 0,
    }
    failed = [k for k, ok in checks.items() if not ok]
    row = dict(
        codes=codes, cases=len(log), faults="SIGTERM under load",
        load=f"{clients} clients; {in_flight_at_sig} requests in flight at SIGTERM",
        errors=f"codes {codes}; {len(accepted_late)} accepted after drain began"
               + (f"; not OK/UNAVAILABLE (times from SIGTERM): {', '.join(odd[:4])} {odd_details}" if odd else ""),
        lost=f"{len(lost)} of {len(before)} sent before SIGTERM",
        result=("pass: " if not failed else "FAIL: " + "; ".join(failed) + "; ")
        + (f"health Watch failed ({watch_error[0][:160]}); " if watch_error else "")
        + f"NOT_SERVING {'never seen' if not_serving is None else f'{(not_serving - t_sig) * 1000:.0f} ms after SIGTERM'}, "
          f"exit {exit_code} {exit_s:.1f} s after SIGTERM (linger {linger:g} s, grace {grace:.0f} s)",
    )
    return row, failed


# grpc core cancels calls it has received but not yet dispatched when server.stop() runs: under
# continuous load a few end CANCELLED instead of UNAVAILABLE (upstream grpc/grpc#41785, fixed by
# grpc/grpc#41786; docs/reliability.md). That one check is left out; every other one must hold.
UPSTREAM_CANCELLED = "only OK and UNAVAILABLE"


def assert_drained(row: dict, failed: list[str]) -> None:
    """Every check of sigterm_under_load but the one the upstream bug breaks, and no code other
    than OK, UNAVAILABLE and that bug's CANCELLED."""
    assert not [f for f in failed if f != UPSTREAM_CANCELLED], (failed, row)
    assert set(row["codes"]) <= {"OK", "UNAVAILABLE", "CANCELLED"}, row["codes"]
