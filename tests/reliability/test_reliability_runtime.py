"""The runtime's SIGTERM drain with and without --drain-linger-s, measured on the reward
server (the runtime is the same for every service; the reward server starts in seconds).

The tail it is about: calls that arrive while grpc's final server.stop() runs end
CANCELLED (grpc/grpc#41785). Clients that keep calling one address will always race
that stop. Clients behind a Kubernetes Service stop sending once the endpoints drop the
pod, a moment after it turns NOT_SERVING; with a linger longer than that moment they are
gone before the server refuses anything, so they see neither UNAVAILABLE nor CANCELLED.
"""
from __future__ import annotations

import os

import pytest

from services.common.config import ClientConfig

from reliability_common import REWARD, record, reward_server

pytestmark = pytest.mark.slow

RUNS = int(os.environ.get("RLHF_SIGTERM_RUNS", "3"))  # per case; docs/reliability.md has a run of 6
GRACE = 10.0
LINGER = 2.0
LEAVE_AFTER_S = 1.0  # how long after NOT_SERVING the "Service" stops sending (endpoint propagation)


@pytest.mark.parametrize("linger", [0.0, LINGER], ids=["no-linger", "linger"])
@pytest.mark.parametrize("clients", ["one address", "behind a Service"])
def test_sigterm_tail_with_and_without_linger(tiny_reward_dir, reliability_logs, request, linger, clients):
    from shutdown_check import UPSTREAM_CANCELLED, sigterm_under_load

    leave = LEAVE_AFTER_S if clients == "behind a Service" else None
    totals: dict[str, int] = {}
    failures, lost = [], []
    for _ in range(RUNS):
        with reward_server(tiny_reward_dir, reliability_logs, "--drain-linger-s", str(linger), "--grace-seconds",
                           str(GRACE)) as server:
            row, failed = sigterm_under_load(server, REWARD, ClientConfig(), "reward", grace=GRACE, clients=32,
                                             linger=linger, leave_after_s=leave)
        for code, n in row["codes"].items():
            totals[code] = totals.get(code, 0) + n
        lost.append(row["lost"])
        # The tail is what this test measures; every other check of the harness must hold.
        failures += [f for f in failed if f != UPSTREAM_CANCELLED]
    cancelled = totals.get("CANCELLED", 0)
    record(request, f"SIGTERM tail: RewardService, 32 clients {clients}"
                    + (f" (leave {LEAVE_AFTER_S:g} s after NOT_SERVING)" if leave else "")
                    + f", --drain-linger-s {linger:g}, {RUNS} runs",
           cases=sum(totals.values()), faults=f"{RUNS} SIGTERMs", load="32 clients",
           errors=f"codes {totals}; CANCELLED {cancelled / RUNS:.1f} per run", lost="; ".join(lost),
           result=("pass" if not failures else "FAIL: " + "; ".join(sorted(set(failures)))))
    assert not failures, failures
    assert set(totals) <= {"OK", "UNAVAILABLE", "CANCELLED"}, totals
    if leave is not None and linger > leave:
        # Gone before the server refused anything: the linger closes the tail for them.
        assert set(totals) == {"OK"}, totals
