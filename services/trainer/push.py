"""Rank 0's side of a weight push: one stream to the fleet, the outcome of every replica, and
the commit across replicas.

The trainer sends each byte once, to one replica, with the others in the header's relay plan
(a chain, or a tree of fan-out services.push_fanout): the replicas pass the stream on as it
arrives and route around one that fails. The answer holds every replica's outcome. A replica
that refused a delta (FAILED_PRECONDITION: it is not at the delta's base) gets a full push
next (services.trainer.rollout decides, as that is a collective). With push_commit all, every
replica stages the push first and then all commit, or none does.

gRPC and the policy client only; the payload comes from services.trainer.image.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

import grpc

from rlhf.v1 import policy_pb2
from services.policy.client import PushOptions, TensorRef

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    """What one replica made of a push."""
    address: str
    ok: bool
    code: str = "OK"  # a gRPC status code name
    message: str = ""
    staged: bool = False
    version: int = 0
    transfer_seconds: float = 0.0
    stage_seconds: float = 0.0
    apply_seconds: float = 0.0
    tensors_reloaded: int = 0

    @property
    def needs_full(self) -> bool:
        """Refused for its own state (another base, another image): a full push heals it."""
        return self.code == "FAILED_PRECONDITION"


@dataclasses.dataclass
class Stream:
    """One push stream and what came of it."""
    outcomes: dict[str, Outcome]
    sent_bytes: int = 0  # the trainer's egress
    payload_bytes: int = 0
    seconds: float = 0.0  # from the first byte to the last replica's answer


def delta_refs(entries: dict[str, bytes], shapes: dict[str, tuple[int, ...]]) -> list[TensorRef]:
    return [TensorRef(name, shapes[name], lambda e=entry: e, len(entry)) for name, entry in entries.items()]


def stream(clients: dict, targets: list[str], refs: Callable[[], Iterable[TensorRef]], version: int, dtype: str,
           options: PushOptions, fanout: int, *, retry: bool) -> Stream:
    """Push to `targets` through one stream: the first replica gets it from here and relays it
    to the others. When the first cannot be reached at all, and `retry` (the payload can be made
    again: a delta), the next one becomes the first. `refs()` gives the payload's TensorRefs."""
    out = Stream({})
    todo = list(targets)
    start = time.perf_counter()
    while todo:
        root, rest = todo[0], todo[1:]
        opts = dataclasses.replace(options, relay=tuple(rest), fanout=fanout)
        try:
            result = clients[root].push(list(refs()), version, dtype, opts)
        except grpc.RpcError as e:
            log.warning("push of version %d to %s failed: %s %s", version, root, e.code().name, e.details())
            out.outcomes[root] = Outcome(root, False, e.code().name, e.details() or "")
            if retry:
                todo = rest
                continue
            for address in rest:
                out.outcomes[address] = Outcome(address, False, "UNAVAILABLE", f"not reached: {root} failed")
            break
        out.sent_bytes += result.sent_bytes
        out.payload_bytes += result.payload_bytes
        # A replica of an older release answers a relayed push as a plain one: its own result.
        outcomes = result.response.outcomes or [policy_pb2.PushOutcome(code="OK", result=result.response)]
        for o in outcomes:
            address = o.address or root
            r = o.result
            out.outcomes[address] = Outcome(address, o.code == "OK", o.code, o.message, r.staged, r.version,
                                            r.transfer_seconds, r.stage_seconds, r.apply_seconds, r.tensors_reloaded)
        break
    for address in targets:  # a relay that lost track of one (it should not): unknown counts as failed
        out.outcomes.setdefault(address, Outcome(address, False, "UNKNOWN", "no outcome came back"))
    out.seconds = time.perf_counter() - start
    return out


def commit_all(clients: dict, staged: list[str], version: int) -> tuple[dict[str, Outcome], float]:
    """Commit the push staged on every replica of `staged` (the second phase); the outcome of
    each commit and the seconds it took."""
    start = time.perf_counter()
    out = {}
    for address in staged:
        try:
            r = clients[address].commit_weights(version)
            out[address] = Outcome(address, True, version=r.version, apply_seconds=r.apply_seconds,
                                   tensors_reloaded=r.tensors_reloaded)
        except grpc.RpcError as e:
            log.warning("commit of version %d on %s failed: %s %s", version, address, e.code().name, e.details())
            out[address] = Outcome(address, False, e.code().name, e.details() or "")
    return out, time.perf_counter() - start


def abort_all(clients: dict, staged: Iterable[str], version: int) -> None:
    """Drop a staged push everywhere (a replica that cannot be reached drops it itself after
    its --stage-timeout-s, or with the next push)."""
    for address in staged:
        try:
            clients[address].abort_weights(version)
        except grpc.RpcError as e:
            log.warning("abort of version %d on %s failed: %s %s", version, address, e.code().name, e.details())


PHASES = ("gather", "encode", "send", "stage", "apply", "commit")


@dataclasses.dataclass
class PushStats:
    """What pushing one version to the fleet did (rank 0): the step's push metrics."""
    version: int
    changed: int = 0  # elements whose served bits changed (a full push: all of them)
    elements: int = 0  # of the whole image
    wire_bytes: int = 0  # the trainer's egress, every stream's messages
    payload_bytes: int = 0  # the chunks' data alone
    kinds: list[str] = dataclasses.field(default_factory=list)  # "delta" / "full", one per stream
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # by phase (PHASES)
    to_all_seconds: float = 0.0  # first byte to the last replica's answer (and commit)
    ok: int = 0
    failed: int = 0

    def add(self, s: Stream, kind: str) -> None:
        """One stream's share: the slowest replica's transfer, stage and apply."""
        self.kinds.append(kind)
        self.wire_bytes += s.sent_bytes
        self.payload_bytes += s.payload_bytes
        self.to_all_seconds += s.seconds
        good = [o for o in s.outcomes.values() if o.ok]
        self.ok += len(good)
        self.failed += len(s.outcomes) - len(good)
        if kind == "full":
            self.changed = self.elements
        for phase, value in (("send", max((o.transfer_seconds for o in good), default=0.0)),
                             ("stage", max((o.stage_seconds for o in good), default=0.0)),
                             ("apply", max((o.apply_seconds for o in good), default=0.0))):
            self.seconds[phase] = self.seconds.get(phase, 0.0) + value

    def apply_seconds(self, seconds: float) -> None:
        self.seconds["apply"] = max(self.seconds.get("apply", 0.0), seconds)

    @property
    def changed_share(self) -> float:
        return self.changed / self.elements if self.elements else 0.0

    def as_dict(self) -> dict[str, float]:
        """The numbers StepMetrics.push and the Prometheus series carry."""
        return {"wire_bytes": float(self.wire_bytes), "payload_bytes": float(self.payload_bytes),
                "changed_share": self.changed_share, "to_all_seconds": self.to_all_seconds,
                "replicas_ok": float(self.ok), "replicas_failed": float(self.failed),
                "delta_streams": float(self.kinds.count("delta")), "full_streams": float(self.kinds.count("full")),
                **{f"{phase}_seconds": self.seconds.get(phase, 0.0) for phase in PHASES}}
