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
from services.policy.client import PolicyClient, PushOptions, TensorRef
from services.reward.client import RewardClient
from services.trainer import distributed, metrics, push
from services.trainer.canary import Canary, CanaryFailed, Verdict, unreachable
from services.trainer.control import ReplicaStatus
from services.trainer.distributed import Dist
from services.trainer.image import Delta, ServedImage
from services.trainer.push import Outcome, PushStats

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
    # Told when a dependency starts failing (name, last error) and when it answers again: how
    # TrainerService shows a run that waits, from whichever thread made the call.
    on_failing: Callable[[str, str], None] | None = None
    on_recovered: Callable[[str], None] | None = None

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
        waits, failed = self.waits(what), False
        while True:
            if self.stop.is_set():
                raise Stopped(f"stopped before calling {what}")
            try:
                result = call()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise RequestRefused(f"{what} refused the request: {e.code().name}: {e.details()}") from e
                if self.on_failing:
                    self.on_failing(what, f"{e.code().name} {e.details()}")
                failed = True
                down = next(waits)
                message = f"{what}: {e.code().name} {e.details()}; retrying (failing for {down:.0f} s)"
                log.warning(message)
                if on_wait:
                    on_wait(message)
                continue
            if failed and self.on_recovered:
                self.on_recovered(what)
            return result


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
    leases: int = 0  # Generate calls using its client now (a background rollout's)
    retired: bool = False  # no address resolves to it any more: closed with its last lease

    def in_sync(self, version: int) -> bool:
        return self.available and self.weight_version == version


@dataclasses.dataclass
class PushConfig:
    """services.push, push_commit and push_fanout (ServicesConfig)."""
    mode: str = "delta"  # full | delta
    commit: str = "each"  # each | all
    fanout: int = 1


class PolicyReplicas:
    """Every policy replica, kept at the trainer's weight version. One per rank; rank 0's knows.

    The set of replicas changes when a dns: address resolves to other hosts (refresh(), on the
    main thread) while a one_step_off rollout generates on them in a background thread. So
    `replicas` is never changed in place (a new dict replaces it: a reader iterates the one it
    took), and the client of a replica that left is closed only when no Generate call holds it
    any more (Replica.leases)."""

    def __init__(self, addresses: Iterable[str], config: ClientConfig, backoff: Backoff, timeout: float, d: Dist,
                 on_change: Callable[[list[ReplicaStatus]], None] | None = None, push: PushConfig | None = None):
        self.addresses, self.config, self.backoff, self.timeout, self.d = list(addresses), config, backoff, timeout, d
        self.replicas: dict[str, Replica] = {}
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="policy")
        self.resyncs = 0  # pushes made to bring a replica back (rank 0)
        self.version = 0  # the version every replica must serve
        self.on_change = on_change
        self.push_config = push or PushConfig()
        self.image: ServedImage | None = None  # what the replicas serve (attach())
        self.dtype = ""  # the served dtype, from GetModelInfo (rank 0)
        self.canary: Canary | None = None
        self.canary_enabled = False
        self.verdict: Verdict | None = None  # the last canary verdict (rank 0)
        self.on_verdict: Callable[[Verdict], None] | None = None
        self.last_push: PushStats | None = None  # rank 0
        self._verified = 0  # the last version that passed the canary
        self._delta: Delta | None = None  # rank 0: the last delta, for replicas still at its base
        self._lock = threading.Lock()  # leases and retiring

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
            self.dtype = self.dtype or info.dtype

        list(self.pool.map(probe, self.replicas.values()))
        self._changed()

    def _track(self, addresses: set[str]) -> None:
        """The replicas behind `addresses` now: new ones get a client, those gone are retired."""
        current = self.replicas
        replicas = {a: r for a, r in current.items() if a in addresses}
        for address in sorted(addresses - set(current)):
            replicas[address] = Replica(address, PolicyClient(address, self.config, timeout=self.timeout))
        self.replicas = replicas  # one assignment: a reader has the old dict or the new one
        for address in set(current) - addresses:
            self._retire(current[address])

    def _retire(self, r: Replica) -> None:
        with self._lock:
            r.retired, r.available = True, False
            idle = r.leases == 0
        if idle:
            r.client.close()

    def _lease(self, replicas: list[Replica]) -> list[Replica]:
        """The replicas of `replicas` still in the set, each held until _unlease()."""
        with self._lock:
            held = [r for r in replicas if not r.retired]
            for r in held:
                r.leases += 1
        return held

    def _unlease(self, r: Replica) -> None:
        with self._lock:
            r.leases -= 1
            close = r.retired and r.leases == 0
        if close:
            r.client.close()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.status())

    def max_version(self) -> int:
        return max((r.weight_version for r in self.replicas.values() if r.available), default=0)

    def status(self) -> list[ReplicaStatus]:
        return [ReplicaStatus(r.address, r.instance_id, max(r.weight_version, 0), r.in_sync(self.version),
                              r.available) for r in self.replicas.values()]

    # ---- every rank: pushes and agreement -------------------------------------------------

    def attach(self, model, scale: float = 1.0, canary: Canary | None = None) -> None:
        """Take the policy's weights now as the image of self.version (collective; after
        refresh() on rank 0, which learnt the served dtype)."""
        dtype = distributed.broadcast_object(self.dtype or "bfloat16", self.d)
        self.image = ServedImage(model, self.d, dtype, scale)
        self.image.snapshot(self.version)
        self.canary = canary  # rank 0's probes; every rank must know whether there is one
        self.canary_enabled = distributed.broadcast_object(canary is not None, self.d)

    def push_all(self) -> PushStats | None:
        """Push self.version, the policy's weights now, to every replica rank 0 sees available
        (collective): a delta against the image of the version before to those serving it, the
        whole image to the others, through one stream each. Returns what it did (rank 0)."""
        delta = self.image.advance(self.version)
        stats = None
        if self.d.main:
            self._delta = delta
            stats = PushStats(self.version, changed=delta.changed, elements=delta.elements,
                              seconds={"encode": delta.encode_seconds, "gather": delta.gather_seconds})
        targets = [a for a, r in self.replicas.items() if r.available] if self.d.main else None
        self._publish(distributed.broadcast_object(targets, self.d), stats)
        self.last_push = stats
        self._changed()
        return stats

    def _publish(self, targets: list[str], stats: PushStats | None) -> None:
        """Bring `targets` to self.version (collective): through the canary first while this
        version has not passed it, then all of them, committed as services.push_commit says."""
        if self.canary_enabled and self._verified < self.version and targets:
            passed = self._canary(targets, stats)
            targets = [a for a in targets if a != passed]
        if not targets:
            return
        all_or_none = self.push_config.commit == "all"
        outcomes = self._deliver(targets, stats, stage_only=all_or_none)
        if self.d.main and all_or_none:
            self._commit_or_abort(targets, outcomes, stats)

    def _canary(self, targets: list[str], stats: PushStats | None) -> str | None:
        """Push this version to one replica and probe it (collective). Returns the canary that
        passed; a failed verdict rolls it back and raises CanaryFailed on every rank."""
        for _ in range(len(targets)):
            choice = None
            if self.d.main:
                base = self._delta.base_version if self._delta else -1
                candidates = sorted(targets, key=lambda a: (self.replicas[a].weight_version != base, a))
                choice = next((a for a in candidates if self.replicas[a].available), None)
            choice = distributed.broadcast_object(choice, self.d)
            if choice is None:
                return None
            probe = None
            if self.d.main:
                r = self.replicas[choice]
                try:  # compared only with the version just before (a stale canary has nothing to compare)
                    probe = self.canary.before(r.client, r.weight_version) if r.weight_version == self.version - 1 \
                        else None
                except grpc.RpcError as e:
                    log.warning("canary %s could not be probed before the push: %s %s", choice, e.code().name,
                                e.details())
            outcome = self._deliver([choice], stats, stage_only=False, keep_previous=True).get(choice)
            verdict = None
            if self.d.main and outcome is not None and outcome.ok:
                r = self.replicas[choice]
                try:
                    verdict = (self.canary.after(r.client, choice, self.version, probe) if probe is not None else
                               Verdict(self.version, choice, True, 0.0, 0.0, 0.0,
                                       f"canary {choice}: version {self.version} is its first: nothing to compare"))
                except grpc.RpcError as e:
                    verdict = unreachable(choice, self.version, e)
                self._record(verdict)
                if not verdict.passed:
                    try:
                        r.weight_version = r.client.rollback_weights(self.version).version
                    except grpc.RpcError as e:
                        log.error("canary %s: rollback of version %d failed: %s %s", choice, self.version,
                                  e.code().name, e.details())
                        r.available = False
            verdict = distributed.broadcast_object(verdict, self.d)
            if verdict is None:  # the canary could not take the push: try another one
                targets = [a for a in targets if a != choice]
                if not targets:
                    return None
                continue
            if not verdict.passed:
                raise CanaryFailed(f"{verdict.message}; rolled back to the version before")
            self._verified = self.version
            return choice
        return None

    def _record(self, verdict: Verdict) -> None:
        self.verdict = verdict
        (log.info if verdict.passed else log.error)("%s", verdict.message)
        if self.on_verdict is not None:
            self.on_verdict(verdict)

    def _deliver(self, targets: list[str], stats: PushStats | None, *, stage_only: bool,
                 keep_previous: bool = False) -> dict[str, Outcome]:
        """Push self.version to `targets` (collective): the delta to those at its base, in one
        stream; the whole image to the rest and to those that refused the delta, in another.
        Returns each replica's outcome (rank 0; {} elsewhere)."""
        outcomes: dict[str, Outcome] = {}
        full = None
        if self.d.main:
            delta = self._delta if self.push_config.mode == "delta" else None
            at_base = [a for a in targets if delta is not None and delta.version == self.version
                       and self.replicas[a].weight_version == delta.base_version]
            full = [a for a in targets if a not in at_base]
            if at_base:
                options = PushOptions(full=False, delta_base=delta.base_version, base_digest=delta.base_digest,
                                      image_digest=delta.image_digest, digest_segments=self.image.segments,
                                      stage_only=stage_only, keep_previous=keep_previous)
                sent = push.stream(self._clients(), at_base, lambda: push.delta_refs(delta.entries, delta.shapes),
                                   self.version, self.image.dtype_name, options, self.push_config.fanout, retry=True)
                outcomes |= sent.outcomes
                stats.add(sent, "delta")
                full += [a for a, o in sent.outcomes.items() if o.needs_full]
                for a in full:
                    if a in sent.outcomes:
                        log.info("%s refused the delta (%s); sending it the whole image", a, sent.outcomes[a].message)
        full = distributed.broadcast_object(full, self.d)
        if full:
            outcomes |= self._push_full(full, stats, stage_only=stage_only, keep_previous=keep_previous)
        if self.d.main:
            for address, o in outcomes.items():
                r = self.replicas.get(address)
                if r is None:
                    continue
                metrics.PUSHES.labels("ok" if o.ok else "failed").inc()
                if o.ok and not o.staged:
                    r.weight_version = self.version
                elif not o.ok:
                    r.available = False
        return outcomes

    def _push_full(self, targets: list[str], stats: PushStats | None, *, stage_only: bool,
                   keep_previous: bool) -> dict[str, Outcome]:
        """The whole image to `targets` through one stream (collective: every rank takes part in
        the gather of each parameter, on rank 0 a sender streams it while the next is gathered)."""
        if not self.d.main:
            for _ in self.image.full():
                pass
            return {}
        feed = _Feed()
        refs = [TensorRef(name, shape, feed.get) for name, shape in self.image.shapes.items()]
        options = PushOptions(full=True, image_digest=self.image.digest, digest_segments=self.image.segments,
                              stage_only=stage_only, keep_previous=keep_previous)
        sender = self.pool.submit(push.stream, self._clients(), targets, lambda: refs, self.version,
                                  self.image.dtype_name, options, self.push_config.fanout, retry=False)
        try:
            for _, tensor in self.image.full():
                feed.put(tensor, sender)
                del tensor
        finally:
            feed.close()
        sent = sender.result()
        stats.add(sent, "full")
        return sent.outcomes

    def _commit_or_abort(self, targets: list[str], outcomes: dict[str, Outcome], stats: PushStats) -> None:
        """push_commit all, rank 0: every target staged the push, so all commit; or one did not,
        so none does and every replica keeps the version before (the canary is rolled back)."""
        staged = [a for a in targets if outcomes.get(a) is not None and outcomes[a].ok and outcomes[a].staged]
        if len(staged) == len(targets):
            committed, seconds = push.commit_all(self._clients(), staged, self.version)
            stats.seconds["commit"] = stats.seconds.get("commit", 0.0) + seconds
            for address, o in committed.items():
                r = self.replicas[address]
                if o.ok:
                    r.weight_version = self.version
                else:
                    r.available = False
                stats.apply_seconds(o.apply_seconds)
            return
        failed = sorted(set(targets) - set(staged))
        push.abort_all(self._clients(), staged, self.version)
        log.warning("push_commit all: %s did not stage version %d (%s); none committed, every replica keeps its "
                    "version", ", ".join(failed), self.version,
                    "; ".join(f"{a}: {outcomes[a].code} {outcomes[a].message}" for a in failed if a in outcomes))
        for address in failed:
            self.replicas[address].available = False
        if self._verified == self.version:  # the canary took this version alone: back with the others
            for r in self.replicas.values():
                if r.weight_version == self.version and r.address not in targets:
                    try:
                        r.weight_version = r.client.rollback_weights(self.version).version
                    except grpc.RpcError:
                        r.available = False
            self._verified = 0

    def _clients(self) -> dict[str, PolicyClient]:
        return {a: r.client for a, r in self.replicas.items()}

    def sync(self, waits: Iterator[float] | None = None, on_wait: Callable[[str], None] | None = None) -> None:
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
                stats = None
                if self.d.main:
                    self.resyncs += len(plan["stale"])
                    log.info("pushing version %d to %s", self.version, ", ".join(plan["stale"]))
                    stats = PushStats(self.version, elements=self.image.elements)
                self._publish(plan["stale"], stats)
            ready = [r.address for r in self.replicas.values() if r.in_sync(self.version)] if self.d.main else None
            ready = distributed.broadcast_object(ready, self.d)
            if not self.d.main:
                self._track(set(plan["addresses"]))
                for r in self.replicas.values():
                    r.available, r.weight_version = r.address in ready, self.version if r.address in ready else -1
            self._changed()
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
        inside: a background rollout calls this while the main thread trains (and may change the
        set of replicas: each one used here is leased until its call returns)."""
        version = self.version if version is None else version
        ready = self._lease([r for r in self.replicas.values() if r.in_sync(version)])
        if not ready:
            return todo, []
        shares = [todo[i::len(ready)] for i in range(len(ready))]

        def run(replica: Replica, idx: list[int]) -> list[int]:
            try:
                if not idx:
                    return []
                try:
                    reply = replica.client.generate([prompt_ids[i] for i in idx], require_weight_version=version,
                                                    **sampling)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        raise RequestRefused(f"policy replica {replica.address} refused Generate: "
                                             f"{e.details()}") from e
                    log.warning("generate on %s failed: %s %s", replica.address, e.code().name, e.details())
                    self._failed(replica)
                    return idx
                replica.failures = 0
                for i, result in zip(idx, reply):
                    results[i] = result
                return []
            finally:
                self._unlease(replica)

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
                replicas = self.replicas
                for address in {a for _, failed in outcome for a in failed} & replicas.keys():
                    if replicas[address].available:
                        self._failed(replicas[address])
            waits = waits or self.backoff.waits("policy replicas")
            sync(waits)

    def close(self) -> None:
        for r in self.replicas.values():
            self._retire(r)
        self.pool.shutdown(wait=False)


class _FeedClosed(RuntimeError):
    """The gather feeding a push stopped before the last tensor."""


class _Feed:
    """A push's side of the gather: gathered tensors handed over one at a time, so rank 0 holds
    at most one tensor beyond the one being gathered."""
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
