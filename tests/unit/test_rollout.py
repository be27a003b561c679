"""The trainer's generation retry loop, with stand-in replica clients (a unit test of
PolicyReplicas.generate_all; the real servers are exercised end to end in tests/e2e and
tests/reliability).

The bug this guards against: a replica whose engine died kept answering GetModelInfo and failing
every Generate with INTERNAL; the trainer retried at ~330 calls/s, never reached its deadline and
ignored SIGTERM."""
from __future__ import annotations

import threading
import time
import types

import grpc
import pytest

from services.common.config import ClientConfig
from services.trainer import distributed
from services.trainer.rollout import Backoff, DependencyDown, PolicyReplicas, Replica, RequestRefused, Stopped


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"stand-in {self._code.name}"


class Client:
    """One replica: answers GetModelInfo at `version`; Generate fails with `code` (or succeeds)."""

    def __init__(self, version: int, code: grpc.StatusCode | None = None):
        self.version, self.code, self.calls = version, code, []

    def model_info(self, timeout=None):
        return types.SimpleNamespace(instance_id="instance", weight_version=self.version, dtype="float32")

    def generate(self, prompts, **kwargs):
        self.calls.append(time.monotonic())
        if self.code is not None:
            raise RpcError(self.code)
        return [types.SimpleNamespace(prompt=p) for p in prompts]

    def close(self):
        pass


def replicas_of(clients: dict[str, Client], backoff: Backoff) -> PolicyReplicas:
    d = distributed.init("cpu", "float32")
    replicas = PolicyReplicas(list(clients), ClientConfig(), backoff, 10.0, d)
    replicas.replicas = {a: Replica(a, c) for a, c in clients.items()}
    replicas.version = 1
    replicas.refresh()
    return replicas


def sync_of(replicas: PolicyReplicas):
    return lambda waits: replicas.sync(waits)


def test_a_replica_failing_every_generate_is_retried_with_backoff_until_the_deadline():
    broken = Client(version=1, code=grpc.StatusCode.INTERNAL)
    replicas = replicas_of({"a:1": broken}, Backoff(initial=0.05, maximum=0.4, deadline=3.0))
    start = time.monotonic()
    with pytest.raises(DependencyDown, match="failing for"):
        replicas.generate_all([[1, 2]] * 4, {}, sync_of(replicas))
    took = time.monotonic() - start
    assert 3.0 <= took < 6.0
    # Backoff (full jitter, doubling to 0.4 s) allows a dozen or so attempts in 3 s; the bug made ~1000.
    assert len(broken.calls) <= 25, len(broken.calls)


def test_a_stop_ends_the_wait_for_a_failing_replica():
    stop = threading.Event()
    replicas = replicas_of({"a:1": Client(1, grpc.StatusCode.INTERNAL)},
                           Backoff(initial=0.5, maximum=10.0, deadline=300.0, stop=stop))
    threading.Timer(0.5, stop.set).start()
    start = time.monotonic()
    with pytest.raises(Stopped):
        replicas.generate_all([[1, 2]], {}, sync_of(replicas))
    assert time.monotonic() - start < 2.0


def test_a_refused_request_is_not_retried():
    refusing = Client(1, grpc.StatusCode.INVALID_ARGUMENT)
    replicas = replicas_of({"a:1": refusing}, Backoff(initial=0.05, maximum=0.4, deadline=30.0))
    with pytest.raises(RequestRefused, match="refused Generate"):
        replicas.generate_all([[1, 2]], {}, sync_of(replicas))
    assert len(refusing.calls) == 1


def test_the_prompts_of_a_failing_replica_go_to_the_healthy_one_and_it_is_left_alone():
    healthy, broken = Client(1), Client(1, grpc.StatusCode.INTERNAL)
    replicas = replicas_of({"a:1": healthy, "b:1": broken}, Backoff(initial=0.2, maximum=2.0, deadline=30.0))
    prompts = [[i] for i in range(8)]
    for _ in range(3):  # three steps
        results = replicas.generate_all(prompts, {}, sync_of(replicas))
        assert [r.prompt for r in results] == prompts
    # The broken replica failed its share once, then sat out its backoff while the healthy one did the work.
    assert len(broken.calls) <= 2, len(broken.calls)
    assert replicas.replicas["b:1"].failures >= 1


def test_a_failing_dependency_is_reported_from_the_thread_that_calls_it_and_cleared_when_it_answers():
    """GetStatus said GENERATING for 15 s of a reward outage in a one_step_off run: the background
    thread retried Score and nothing told the status. Backoff now reports every retried failure."""
    from services.trainer.control import Control, Phase

    control = Control(total_steps=10)
    control.set_phase(Phase.GENERATING)
    backoff = Backoff(initial=0.01, maximum=0.01, deadline=30, on_failing=control.dependency_failing,
                      on_recovered=control.dependency_ok)
    seen, failures = [], iter([grpc.StatusCode.UNAVAILABLE] * 3)

    def call():
        code = next(failures, None)
        seen.append(control.snapshot())
        if code is not None:
            raise RpcError(code)
        return "scored"

    worker = threading.Thread(target=lambda: seen.append(backoff.retry("reward service", call)))
    worker.start()
    worker.join(10)
    assert seen[-1] == "scored"
    during = seen[1:4]  # snapshots taken while the earlier calls had failed
    assert all(s.phase == Phase.WAITING and s.waiting.dependency == "reward service" for s in during), during
    assert len({s.waiting.since for s in during}) == 1  # since the first failure, not the latest
    assert "waiting for reward service since" in during[0].message and "UNAVAILABLE" in during[0].message
    assert seen[0].phase == Phase.GENERATING and control.snapshot().phase == Phase.GENERATING  # cleared


def test_the_longest_wait_is_shown_and_a_finished_run_is_not_waiting():
    from services.trainer.control import Control, Phase

    control = Control(total_steps=1)
    control.set_phase(Phase.TRAINING)
    control.dependency_failing("policy replicas", "no replica serves version 3")
    time.sleep(0.01)
    control.dependency_failing("reward service", "UNAVAILABLE")
    assert control.snapshot().waiting.dependency == "policy replicas"
    control.dependency_ok("policy replicas")
    assert control.snapshot().waiting.dependency == "reward service"
    control.finish(Phase.FAILED, "reward service failing for 300 s")
    assert control.snapshot().phase == Phase.FAILED


class BlockingClient(Client):
    """A replica whose Generate waits until the test lets it go; it records a use after close()."""

    def __init__(self, version: int):
        super().__init__(version)
        self.entered, self.release, self.closed, self.used_closed = threading.Event(), threading.Event(), False, False

    def generate(self, prompts, **kwargs):
        self.entered.set()
        self.release.wait(10)
        self.used_closed |= self.closed
        return super().generate(prompts, **kwargs)

    def close(self):
        self.closed = True


def test_a_replica_leaving_the_dns_answer_is_closed_only_after_its_generate(monkeypatch):
    """issue 21: a dns: address re-resolved (rank 0's refresh) while a one_step_off rollout
    generates in the background. The set of replicas is replaced, never changed in place (the
    background thread iterates the dict it took), and a replica that left keeps its client until
    the Generate using it returns."""
    from services.trainer import rollout

    answers = {"hosts": ["127.0.0.1", "127.0.0.2"]}
    monkeypatch.setattr(rollout, "expand", lambda address: [f"{h}:1" for h in answers["hosts"]])
    a, b = BlockingClient(1), BlockingClient(1)
    replicas = replicas_of({"127.0.0.1:1": a, "127.0.0.2:1": b}, Backoff(initial=0.05, maximum=0.4, deadline=30.0))
    replicas.addresses = ["dns:///replicas.test:1"]
    a.release.set()
    before = replicas.replicas
    results = [None] * 4
    background = threading.Thread(target=lambda: replicas.generate([[i] for i in range(4)], {}, [0, 1, 2, 3], results))
    background.start()
    assert b.entered.wait(10)
    answers["hosts"] = ["127.0.0.1"]  # b leaves the answer while its Generate runs
    replicas.refresh()
    assert set(replicas.replicas) == {"127.0.0.1:1"} and set(before) == {"127.0.0.1:1", "127.0.0.2:1"}
    assert not b.closed  # still in use
    b.release.set()
    background.join(10)
    assert b.closed and not b.used_closed and all(r is not None for r in results)
    answers["hosts"] = ["127.0.0.1", "127.0.0.2"]
    replicas.refresh()  # it comes back: a new client
    assert replicas.replicas["127.0.0.2:1"].client is not b
