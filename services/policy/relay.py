"""Passing a weight push on to further replicas as it arrives (WeightsHeader.relay).

The server that receives a push with a relay plan hands each message to a Relay, which
streams it to the replica's children (services.policy.wire.relay_children), each with its
share of the plan as its own relay, so the trainer sends each byte once whatever the number
of replicas. Chunks go on as they came (the received message bytes, no copy), after this
replica wrote them to its staging file: that file is what lets a parent route around a child
that fails. When a child's stream ends before the push did (it died, refused, or stopped
reading), the parent opens streams to that child's own children and replays the bytes so far
from its staged copy, then goes on live.

Its own module because a server never imports its own client: this is the small part of a
client the server needs (one client-streaming call of pre-serialized messages), with the
relaying replica's own credentials (--relay-* flags). grpc, protobuf and the wire format
only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc

from rlhf.v1 import policy_pb2
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.policy.metrics import RELAYED_BYTES, RELAYS
from services.policy.wire import PUSH_TOKEN_KEY, encode_chunk, relay_children

log = logging.getLogger(__name__)

METHOD = "/rlhf.v1.PolicyService/UpdateWeights"
QUEUE_MESSAGES = 8  # chunks in flight per child: enough to keep the pipe full, little memory
REPLAY_CHUNK = 1 << 20
_END = object()


@dataclasses.dataclass
class _Child:
    address: str
    plan: list[str]  # the addresses it relays to in turn
    queue: asyncio.Queue
    live_from: int = 0  # payload offset from which chunks come live (those before are replayed)
    task: asyncio.Task | None = None
    channel: grpc.aio.Channel | None = None
    replaced: bool = False  # routed around: its children are ours now


class Relay:
    """One push passed on to this replica's children: put_chunk() each chunk after this replica
    staged it, put_commit(), end() after the last message, then outcomes() for every replica
    below."""

    def __init__(self, header: policy_pb2.WeightsHeader, config: ClientConfig, push_token: str | None,
                 staged_file, idle_timeout_s: float):
        """staged_file() gives the path of this replica's staged copy, or None when it has
        none (it could not stage: no replay, a failed child's children fail)."""
        self.header, self.config, self.push_token = header, config, push_token
        self.staged_file, self.idle_timeout_s = staged_file, idle_timeout_s
        self.children: list[_Child] = []
        self.forwarded = 0  # payload bytes put so far: all of them are in the staged file
        self.commit: bytes | None = None
        self.ended = False
        for address, plan in relay_children(list(header.relay.addresses), header.relay.fanout):
            self._start(address, plan, replay_to=0)

    # ---- the stream -----------------------------------------------------------------------

    async def put_chunk(self, raw: bytes, offset: int, size: int) -> None:
        # Counted first: a child routed around while this chunk is being put replays it.
        self.forwarded = offset + size
        await self._put(raw, offset)

    async def put_commit(self, raw: bytes) -> None:
        self.commit = raw
        await self._put(raw)

    async def end(self) -> None:
        self.ended = True
        await self._put(_END)

    async def _put(self, item, offset: int | None = None) -> None:
        i = 0
        while i < len(self.children):  # a child routed around meanwhile adds children: they count too
            child = self.children[i]
            i += 1
            if child.replaced or child.task.done() or (offset is not None and offset < child.live_from):
                continue
            try:
                await asyncio.wait_for(child.queue.put(item), self.idle_timeout_s)
            except TimeoutError:
                log.warning("relay: %s took nothing for %g s; routing around it", child.address, self.idle_timeout_s)
                child.task.cancel()
                continue
            if isinstance(item, bytes):
                RELAYED_BYTES.inc(len(item))

    def cancel(self) -> None:
        """This replica stops before the end of the push: its children's streams are cancelled
        (each drops its partial push), and its parent routes around it."""
        for child in self.children:
            if child.task is not None:
                child.task.cancel()

    # ---- children ---------------------------------------------------------------------------

    def _start(self, address: str, plan: list[str], replay_to: int) -> None:
        """Open the stream to one child; a replacement (routing around) first replays the
        `replay_to` bytes already passed on, from this replica's staged copy."""
        header = policy_pb2.WeightsHeader()
        header.CopyFrom(self.header)
        del header.relay.addresses[:]
        header.relay.addresses.extend(plan)
        child = _Child(address, plan, asyncio.Queue(QUEUE_MESSAGES), live_from=replay_to)
        child.channel = create_channel(address, self.config, aio=True)
        call = child.channel.stream_unary(METHOD, request_serializer=None,
                                          response_deserializer=policy_pb2.UpdateWeightsResponse.FromString)
        metadata = ((PUSH_TOKEN_KEY, self.push_token),) if self.push_token else None
        first = policy_pb2.UpdateWeightsRequest(header=header).SerializeToString()
        messages = self._messages(child, first, replay_to, ended=self.ended)
        child.task = asyncio.ensure_future(call(messages, metadata=metadata))
        child.task.add_done_callback(lambda _task, c=child: self._done(c))
        self.children.append(child)

    async def _messages(self, child: _Child, first: bytes, replay_to: int, ended: bool):
        yield first
        if replay_to:
            source = self.staged_file()
            if source is None:
                raise RuntimeError("this replica staged nothing to replay from")
            for offset in range(0, replay_to, REPLAY_CHUNK):
                data = await asyncio.to_thread(_read, source, offset, min(REPLAY_CHUNK, replay_to - offset))
                message = encode_chunk(offset, data)
                RELAYED_BYTES.inc(len(message))
                yield message
        if ended:  # the push had been passed on whole already: nothing comes live any more
            if self.commit is not None:
                yield self.commit
            return
        while (item := await child.queue.get()) is not _END:
            yield item

    def _done(self, child: _Child) -> None:
        """A child's stream ended. Unless it ended well after the whole push went to it, its
        children become ours: each gets the push straight from here, the bytes so far replayed
        from this replica's staged copy."""
        task = child.task
        whole = self.ended and not task.cancelled() and task.exception() is None
        if whole or child.replaced or not child.plan:
            return
        child.replaced = True
        log.warning("relay: %s failed during the push (%s); sending to %s directly", child.address, _why(task),
                    ", ".join(child.plan))
        for address, plan in relay_children(child.plan, self.header.relay.fanout):
            self._start(address, plan, replay_to=self.forwarded)

    async def outcomes(self) -> list[policy_pb2.PushOutcome]:
        """Wait for every child (and every child routed around) and return the outcome of each
        replica below this one."""
        out: list[policy_pb2.PushOutcome] = []
        i = 0
        while i < len(self.children):  # routing around adds children while we wait
            child = self.children[i]
            i += 1
            try:
                response = await child.task
            except BaseException as e:  # noqa: BLE001 - every failure is an outcome, never ours
                if not isinstance(e, Exception | asyncio.CancelledError):
                    raise
                rpc = isinstance(e, grpc.aio.AioRpcError)
                RELAYS.labels("unreachable").inc()
                out.append(policy_pb2.PushOutcome(
                    address=child.address, code=e.code().name if rpc else "UNAVAILABLE",
                    message=e.details() if rpc else f"relay: {_why(child.task)}"))
                if not child.replaced:  # nobody routed around it: its subtree did not get the push
                    out += [policy_pb2.PushOutcome(address=a, code="UNAVAILABLE",
                                                   message=f"not reached: {child.address} failed on the way")
                            for a in child.plan]
                continue
            finally:
                await child.channel.close()
            outcomes = list(response.outcomes)
            if not outcomes:  # a server that does not relay: its own result, as a plain push
                outcomes = [policy_pb2.PushOutcome(code="OK", result=response)]
            outcomes[0].address = child.address
            RELAYS.labels("ok" if outcomes[0].code == "OK" else "refused").inc()
            out += outcomes[:1] if child.replaced else outcomes  # routed around: its children's are ours
        return out


def _why(task: asyncio.Task) -> str:
    if task.cancelled():
        return "cancelled"
    e = task.exception()
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name} {e.details()}"
    return repr(e) if e else "answered before the end of the push"


def _read(path: str, offset: int, size: int) -> bytes:
    """Bytes of this replica's staged copy (written before they were passed on)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
