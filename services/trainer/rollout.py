"""The trainer's side of the wire: generation spread over every policy replica, scoring, weight
pushes, and recovery when a dependency goes away.

The trainer owns the truth about weights: every replica must serve the trainer's version before
it is used, a replica that restarted (new instance id) or missed a push is brought back by
pushing the current weights, and a completion produced by another version is dropped, never
trained on.

With several ranks, rank 0 is the one that knows the replicas: it probes them and decides what to
push; every rank generates and scores its own share of a step's prompts. A push is a collective
(each parameter is gathered from every rank's shard), so whether to push is decided on rank 0 and
broadcast, and every rank takes part in the gather.

Every failure is retried with exponential backoff and jitter, bounded by
services.dependency_deadline_s of consecutive failure, and a stop request (SIGTERM) ends any wait.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from services.common.config import ClientConfig
from services.policy.client import PolicyClient, TensorRef
from services.reward.client import RewardClient
from services.trainer import distributed, metrics
from services.trainer.control import ReplicaStatus
from services.trainer.distributed import Dist

log = logging.getLogger(__name__)
T = TypeVar("T")

# A call failing with these says nothing is wrong with the request: the service is down,
# restarting, overloaded or broken (INTERNAL: e.g. a dead engine behind a live server). Retry.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN}


class DependencyDown(RuntimeError):
    """A service kept failing past services.dependency_deadline_s."""


class Stopped(RuntimeError):
    """A stop (SIGTERM) came while waiting for a dependency."""


class RequestRefused(RuntimeError):
    """A service refused a request as invalid: retrying it cannot help (a bug or a misconfiguration)."""


@dataclasses.dataclass
class Backoff:
    """Exponential backoff with full jitter (replicas restarting together must not be retried in
    lockstep), a deadline on consecutive failure, and a stop event that ends every wait."""
    initial: float = 0.5
    maximum: float = 10.0
    deadline: float = 300.0
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    def waits(self, what: str) -> Iterator[float]:
        """Yields before each retry, after sleeping; raises DependencyDown past the deadline and
        Stopped when a stop is asked for."""
        start, delay = time.monotonic(), self.initial
        while True:
            down = time.monotonic() - start
            if down > self.deadline:
                raise DependencyDown(f"{what} failing for {down:.0f} s (services.dependency_deadline_s = "
                                     f"{self.deadline:.0f})")
            if self.stop.wait(random.uniform(0, delay)):
                raise Stopped(f"stopped while waiting for {what}")
            delay = min(delay * 2, self.maximum)
            yield down

    def retry(self, what: str, call: Callable[[], T], on_wait: Callable[[str], None] | None = None) -> T:
        """call() until it succeeds; retryable errors wait, others raise RequestRefused."""
        waits = self.waits(what)
        while True:
            if self.stop.is_set():
                raise Stopped(f"stopped before calling {what}")
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise RequestRefused(f"{what} refused the request: {e.code().name}: {e.details()}") from e
                down = next(waits)
                message = f"{what}: {e.code().name} {e.details()}; retrying (failing for {down:.0f} s)"
                log.warning(message)
                if on_wait:
                    on_wait(message)


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
    failures: int = 0  # Generate failures in a row
    retry_at: float = 0.0  # monotonic time before which a failing replica gets no work

    def in_sync(self, version: int) -> bool:
        return self.available and self.weight_version == version


class PolicyReplicas:
    """Every policy replica, kept at the trainer's weight version. One per rank; rank 0's knows."""

    def __init__(self, addresses: Iterable[str], config: ClientConfig, backoff: Backoff, timeout: float, d: Dist,
                 on_change: Callable[[list[ReplicaStatus]], None] | None = None):
        self.addresses, self.config, self.backoff, self.timeout, self.d = list(addresses), config, backoff, timeout, d
        self.replicas: dict[str, Replica] = {}
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="policy")
        self.resyncs = 0  # pushes made to bring a replica back (rank 0)
        self.version = 0  # the version every replica must serve
        self.on_change = on_change

    # ---- rank 0: what the replicas serve ---------------------------------------------------

    def refresh(self) -> None:
        """Re-resolve the addresses and ask every replica what it serves (rank 0)."""
        self._track({a for address in self.addresses for a in expand(address)})

        def probe(r: Replica) -> None:
            try:
                info = r.client.model_info(timeout=5.0)  # short: a hung replica must not stall the step
            except grpc.RpcError:
                r.available = False
                return
            if r.instance_id and info.instance_id != r.instance_id:
                log.warning("policy replica %s restarted (instance %s -> %s, version %d)",
                            r.address, r.instance_id[:8], info.instance_id[:8], info.weight_version)
                r.failures, r.retry_at = 0, 0.0  # a new process: a clean slate
            # A replica that answers GetModelInfo but fails Generate (a dead engine behind a live
            # server) stays out until its backoff has passed.
            r.instance_id, r.weight_version = info.instance_id, info.weight_version
            r.available = time.monotonic() >= r.retry_at

        list(self.pool.map(probe, self.replicas.values()))
        self._changed()

    def _track(self, addresses: set[str]) -> None:
        for gone in set(self.replicas) - addresses:
            self.replicas.pop(gone).client.close()
        for address in sorted(addresses - set(self.replicas)):
            self.replicas[address] = Replica(address, PolicyClient(address, self.config, timeout=self.timeout))

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.status())

    def max_version(self) -> int:
        return max((r.weight_version for r in self.replicas.values() if r.available), default=0)

    def status(self) -> list[ReplicaStatus]:
        return [ReplicaStatus(r.address, r.instance_id, max(r.weight_version, 0), r.in_sync(self.version),
                              r.available) for r in self.replicas.values()]

    # ---- every rank: pushes and agreement -------------------------------------------------

    def push(self, parameters: Callable[[], Iterator[tuple[str, object]]], shapes: list[tuple[str, tuple[int, ...]]],
             version: int, targets: list[str]) -> dict[str, float]:
        """Push the trainer's weights as `version` to `targets` (addresses known to rank 0).

        Every rank runs `parameters()` to its end (each item is a gather); on rank 0 each gathered
        tensor goes to one queue per replica, whose sender streams it while the next one is
        gathered. A replica that fails is marked unavailable, not fatal: the next sync brings
        it back. Returns seconds per replica (rank 0; {} elsewhere)."""
        if not self.d.main:
            for _ in parameters():
                pass
            return {}
        targets = [self.replicas[a] for a in targets if a in self.replicas]
        feeds = {r.address: _Feed() for r in targets}

        def send(r: Replica) -> float:
            start = time.perf_counter()
            refs = [TensorRef(name, shape, feeds[r.address].get) for name, shape in shapes]
            try:
                reply = r.client.push_weights(refs, version=version)
                r.weight_version = reply.version
                metrics.PUSHES.labels("ok").inc()
            except (grpc.RpcError, _FeedClosed) as e:
                metrics.PUSHES.labels("failed").inc()
                details = f"{e.code().name} {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
                log.warning("push of version %d to %s failed: %s", version, r.address, details)
                r.available = False
            return time.perf_counter() - start

        senders = {r.address: self.pool.submit(send, r) for r in targets}
        try:
            for _, tensor in parameters():
                for address, feed in feeds.items():
                    feed.put(tensor, senders[address])
                del tensor
        finally:
            for feed in feeds.values():
                feed.close()
        seconds = {address: f.result() for address, f in senders.items()}
        self._changed()
        return seconds

    def push_all(self, parameters, shapes) -> dict[str, float]:
        """Push self.version to every replica rank 0 sees available (collective)."""
        targets = [r.address for r in self.replicas.values() if r.available] if self.d.main else None
        return self.push(parameters, shapes, self.version, distributed.broadcast_object(targets, self.d))

    def sync(self, parameters, shapes, waits: Iterator[float] | None = None,
             on_wait: Callable[[str], None] | None = None) -> None:
        """Bring every reachable replica to self.version; return once at least one serves it
        (collective). Rank 0 probes, decides and pushes; every rank takes part in the gathers and
        learns which replicas are in sync. `waits` (Backoff.waits, rank 0's) paces repeated
        failures: given, the first probe waits for its turn too."""
        wait_first = waits is not None
        waits = waits if waits is not None else self.backoff.waits("policy replicas")
        first = True
        while True:
            plan = None
            if self.d.main:
                try:
                    if wait_first or not first:
                        next(waits)
                    self.refresh()
                    stale = [r.address for r in self.replicas.values()
                             if r.available and r.weight_version != self.version]
                    plan = {"addresses": sorted(self.replicas), "stale": stale}
                except (DependencyDown, Stopped) as e:
                    plan = {"error": (type(e), str(e))}
            plan = distributed.broadcast_object(plan, self.d)
            first = False
            if "error" in plan:
                cls, message = plan["error"]
                raise cls(message)
            if plan["stale"]:
                if self.d.main:
                    self.resyncs += len(plan["stale"])
                    log.info("pushing version %d to %s", self.version, ", ".join(plan["stale"]))
                self.push(parameters, shapes, self.version, plan["stale"])
            ready = [r.address for r in self.replicas.values() if r.in_sync(self.version)] if self.d.main else None
            ready = distributed.broadcast_object(ready, self.d)
            if not self.d.main:
                self._track(set(plan["addresses"]))
                for r in self.replicas.values():
                    r.available, r.weight_version = r.address in ready, self.version if r.address in ready else -1
            if ready:
                return
            message = f"no policy replica serves version {self.version}; retrying"
            log.warning(message)
            if on_wait:
                on_wait(message)

    # ---- every rank: generation ------------------------------------------------------------

    def _failed(self, replica: Replica) -> None:
        """Keep a replica whose Generate failed out of the work for a while, longer each time."""
        replica.available, replica.failures = False, replica.failures + 1
        pause = min(self.backoff.initial * 2 ** (replica.failures - 1), self.backoff.maximum)
        replica.retry_at = time.monotonic() + pause

    def generate(self, prompt_ids: list[list[int]], sampling: dict, todo: list[int], results: list,
                 version: int | None = None) -> tuple[list[int], list[str]]:
        """One attempt at the prompts `todo` (indices into prompt_ids), spread over the replicas
        serving `version` (default: the trainer's); fills results[i] with the PromptResult of
        prompt i. Returns the indices that failed and the replicas that failed them. No collective
        inside: a background rollout calls this while the main thread trains."""
        version = self.version if version is None else version
        ready = [r for r in self.replicas.values() if r.in_sync(version)]
        if not ready:
            return todo, []
        shares = [todo[i::len(ready)] for i in range(len(ready))]

        def run(replica: Replica, idx: list[int]) -> list[int]:
            if not idx:
                return []
            try:
                reply = replica.client.generate([prompt_ids[i] for i in idx], require_weight_version=version,
                                                **sampling)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise RequestRefused(f"policy replica {replica.address} refused Generate: {e.details()}") from e
                log.warning("generate on %s failed: %s %s", replica.address, e.code().name, e.details())
                self._failed(replica)
                return idx
            replica.failures = 0
            for i, result in zip(idx, reply):
                results[i] = result
            return []

        failed = dict(zip((r.address for r in ready), self.pool.map(run, ready, shares)))
        return [i for idx in failed.values() for i in idx], [a for a, idx in failed.items() if idx]

    def generate_all(self, prompt_ids: list[list[int]], sampling: dict, sync: Callable[[Iterator[float]], None]) -> list:
        """The PromptResult of each of this rank's prompts (collective: every rank calls it with its
        own share). Prompts whose replica failed are retried once the replicas were synced again
        (a failed replica may have restarted), each round after a backoff: a replica that keeps
        failing (a dead engine behind a live server) is not hammered, and the deadline and a stop
        end the wait."""
        results: list = [None] * len(prompt_ids)
        todo, waits = list(range(len(prompt_ids))), None
        while True:
            outcome = distributed.agree(lambda: self.generate(prompt_ids, sampling, todo, results), self.d,
                                        (RequestRefused,))
            todo = outcome[self.d.rank][0]
            if not any(left for left, _ in outcome):
                return results
            if self.d.main:  # what the other ranks saw fail, rank 0 keeps out of the next round too
                for address in {a for _, failed in outcome for a in failed} & self.replicas.keys():
                    if self.replicas[address].available:
                        self._failed(self.replicas[address])
            waits = waits or self.backoff.waits("policy replicas")
            sync(waits)

    def close(self) -> None:
        for r in self.replicas.values():
            r.client.close()
        self.pool.shutdown(wait=False)


class _FeedClosed(RuntimeError):
    """The gather feeding a push stopped before the last tensor."""


class _Feed:
    """One replica's side of a push's fan-out: gathered tensors handed over one at a time, so rank 0
    holds at most one tensor per replica beyond the one being gathered."""
    _CLOSED = object()

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=1)

    def put(self, tensor, sender) -> None:
        while not sender.done():  # a sender that failed takes nothing more
            try:
                self._queue.put(tensor, timeout=0.1)
                return
            except queue.Full:
                pass

    def get(self):
        item = self._queue.get()
        if item is self._CLOSED:
            raise _FeedClosed("the gather of the weights stopped before the last tensor")
        return item

    def close(self) -> None:
        try:
            self._queue.put_nowait(self._CLOSED)
        except queue.Full:  # the sender is gone or will see its last tensor; nothing waits for this
            pass


class Scorer:
    """The reward service, with the same patience as the policy replicas."""

    def __init__(self, address: str, config: ClientConfig, backoff: Backoff, timeout: float):
        self.client = RewardClient(address, config, timeout=timeout)
        self.backoff = backoff
        self.max_pairs = 0  # the service's limit per Score, asked once

    def model_info(self):
        return self.backoff.retry("reward service", self.client.model_info)

    def score(self, pairs: list[tuple[str, str | list[int]]], normalize: bool, on_wait=None):
        """One ScoreResult per pair, in order, each naming the reward model version that scored it:
        in requests of at most the service's max_pairs (their versions may differ when the service
        swaps its model meanwhile: collect.unify_reward_versions makes them one)."""
        if not self.max_pairs:
            self.max_pairs = self.model_info().max_pairs or 256
        results = []
        for i in range(0, len(pairs), self.max_pairs):
            chunk = pairs[i:i + self.max_pairs]
            reply = self.backoff.retry("reward service", lambda: self.client.score(
                chunk, truncation="keep_end_of_prompt", normalize=normalize), on_wait)
            results += reply.results
        return results

    def close(self) -> None:
        self.client.close()
