"""The trainer's side of the wire: generation spread over every policy replica, scoring,
weight pushes, and recovery when a dependency goes away.

The trainer owns the truth about weights: every replica must serve the trainer's version
before it is used, a replica that restarted (new instance id) or missed a push is brought
back by pushing the current weights, and a completion produced by another version is
dropped, never trained on.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from services.common.config import ClientConfig
from services.policy.client import PolicyClient
from services.reward.client import RewardClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# A dependency answering these is down or restarting: wait and retry.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


class DependencyDown(RuntimeError):
    """A service stayed unavailable past services.dependency_deadline_s."""


@dataclasses.dataclass
class Backoff:
    initial: float = 0.5
    maximum: float = 10.0
    deadline: float = 300.0

    def retry(self, what: str, call: Callable[[], T], on_wait: Callable[[str], None] | None = None) -> T:
        """`call()` until it succeeds; transient errors wait with exponential backoff and full
        jitter (replicas restarting together must not retry in lockstep)."""
        start, delay = time.monotonic(), self.initial
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in TRANSIENT:
                    raise
                waited = time.monotonic() - start
                if waited > self.deadline:
                    raise DependencyDown(f"{what} unavailable for {waited:.0f} s (deadline "
                                         f"{self.deadline:.0f} s): {e.code().name} {e.details()}") from e
                message = f"{what}: {e.code().name}, retrying (down {waited:.0f} s)"
                log.warning(message)
                if on_wait:
                    on_wait(message)
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, self.maximum)


def expand(address: str) -> list[str]:
    """Every replica behind an address: "dns:///name:port" resolves to one host:port per
    A/AAAA record (a headless Service), anything else is one replica."""
    if not address.startswith("dns:"):
        return [address]
    host, _, port = address.split("/")[-1].rpartition(":")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    ips = sorted({i[4][0] for i in infos})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


@dataclasses.dataclass
class Replica:
    address: str
    client: PolicyClient
    instance_id: str = ""
    weight_version: int = -1
    available: bool = False

    def in_sync(self, version: int) -> bool:
        return self.available and self.weight_version == version


class PolicyReplicas:
    """Every policy replica, kept at the trainer's weight version."""

    def __init__(self, addresses: Iterable[str], config: ClientConfig, backoff: Backoff, timeout: float):
        self.addresses, self.config, self.backoff, self.timeout = list(addresses), config, backoff, timeout
        self.replicas: dict[str, Replica] = {}
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="policy")
        self.resyncs = 0  # pushes made to bring a replica back, for the metrics

    def refresh(self) -> None:
        """Re-resolve addresses and ask every replica what it serves."""
        current = {a for address in self.addresses for a in expand(address)}
        for gone in set(self.replicas) - current:
            self.replicas.pop(gone).client.close()
        for address in current - set(self.replicas):
            self.replicas[address] = Replica(address, PolicyClient(address, self.config, timeout=self.timeout))

        def probe(r: Replica) -> None:
            try:
                info = r.client.model_info(timeout=5.0)  # short: a hung replica must not stall the step
            except grpc.RpcError:
                r.available = False
                return
            if r.instance_id and info.instance_id != r.instance_id:
                log.warning("policy replica %s restarted (instance %s -> %s, version %d)",
                            r.address, r.instance_id[:8], info.instance_id[:8], info.weight_version)
            r.instance_id, r.weight_version, r.available = info.instance_id, info.weight_version, True

        list(self.pool.map(probe, self.replicas.values()))

    def max_version(self) -> int:
        return max((r.weight_version for r in self.replicas.values() if r.available), default=0)

    def push(self, named_tensors: Callable[[], Iterable], version: int, only_stale: bool = False) -> dict[str, float]:
        """Push the weights as `version` to every available replica (or those not at it) in
        parallel. A replica that fails the push is marked unavailable, not fatal: the next
        sync() brings it back. Returns seconds per replica."""
        targets = [r for r in self.replicas.values() if r.available and not (only_stale and r.weight_version == version)]

        def push_one(r: Replica) -> float:
            start = time.perf_counter()
            try:
                reply = r.client.push_weights(named_tensors(), version=version)
                r.weight_version = reply.version
            except grpc.RpcError as e:
                log.warning("push of version %d to %s failed: %s %s", version, r.address, e.code().name, e.details())
                r.available = False
            return time.perf_counter() - start

        return dict(zip([r.address for r in targets], self.pool.map(push_one, targets)))

    def sync(self, named_tensors: Callable[[], Iterable], version: int,
             on_wait: Callable[[str], None] | None = None) -> list[Replica]:
        """Wait until at least one replica serves `version`; push it to every replica that
        came back with a new instance id or an older version. Returns the in-sync replicas."""
        def attempt() -> list[Replica]:
            self.refresh()
            stale = [r for r in self.replicas.values() if r.available and r.weight_version != version]
            if stale:
                self.resyncs += len(stale)
                log.info("re-syncing %s to version %d", ", ".join(r.address for r in stale), version)
                self.push(named_tensors, version, only_stale=True)
            ready = [r for r in self.replicas.values() if r.in_sync(version)]
            if not ready:
                raise _Unavailable(f"no policy replica serves version {version}")
            return ready

        return self.backoff.retry("policy replicas", attempt, on_wait)

    def generate(self, prompt_ids: list[list[int]], version: int, sampling: dict,
                 named_tensors: Callable[[], Iterable], on_wait=None) -> list:
        """Completions for every prompt (one PromptResult each, in order), spread over the
        in-sync replicas; a replica that fails mid-step is dropped and its share retried."""
        results: list = [None] * len(prompt_ids)
        todo = list(range(len(prompt_ids)))
        while todo:
            ready = self.sync(named_tensors, version, on_wait)
            shares = [todo[i::len(ready)] for i in range(len(ready))]

            def run(replica: Replica, idx: list[int]) -> list[int]:
                if not idx:
                    return []
                try:
                    reply = replica.client.generate([prompt_ids[i] for i in idx], require_weight_version=version,
                                                    **sampling)
                except grpc.RpcError as e:
                    log.warning("generate on %s failed: %s %s", replica.address, e.code().name, e.details())
                    replica.available = False
                    return idx
                for i, result in zip(idx, reply):
                    results[i] = result
                return []

            todo = [i for failed in self.pool.map(run, ready, shares) for i in failed]
        return results

    def status(self, version: int) -> list[dict]:
        return [dict(address=r.address, instance_id=r.instance_id, weight_version=max(r.weight_version, 0),
                     in_sync=r.in_sync(version), available=r.available) for r in self.replicas.values()]

    def close(self) -> None:
        for r in self.replicas.values():
            r.client.close()
        self.pool.shutdown(wait=False)


class _Unavailable(grpc.RpcError):
    """Lets sync() reuse the transient-error retry when no replica is ready."""

    def __init__(self, details: str):
        self._details = details

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return self._details


class Scorer:
    """The reward service, with the same patience as the policy replicas."""

    def __init__(self, address: str, config: ClientConfig, backoff: Backoff, timeout: float):
        self.client = RewardClient(address, config, timeout=timeout)
        self.backoff = backoff

    def model_info(self):
        return self.backoff.retry("reward service", self.client.model_info)

    def scores(self, pairs: list[tuple[str, str]], on_wait=None) -> list[float]:
        """Raw scores (the trainer normalizes with the statistics from model_info)."""
        reply = self.backoff.retry("reward service", lambda: self.client.score(pairs, truncation="keep_end_of_prompt"),
                                   on_wait)
        return [r.raw_score for r in reply.results]

    def close(self) -> None:
        self.client.close()
