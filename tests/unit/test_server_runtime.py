"""services.common.server.serve, in process, with a servicer that reports a fatal failure:
health turns NOT_SERVING and serve returns the non-zero exit code promptly, without the
drain's grace period. (The policy's real case, a killed vLLM engine core, is in
tests/reliability/test_reliability_policy.py.)"""
from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import ServerConfig
from services.common.server import EXIT_FATAL, FATAL_GRACE_S, serve
from services.demo.launch import free_port


class FailingServicer:
    service_name = "test.v1.FailingService"

    def __init__(self):
        self.failure = asyncio.Event()
        self.stopped = False

    def add_to_server(self, server) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def fatal(self) -> str:
        await self.failure.wait()
        return "its engine died"


def test_a_fatal_failure_turns_health_not_serving_and_exits_non_zero():
    async def main():
        servicer = FailingServicer()
        cfg = ServerConfig(host="127.0.0.1", port=free_port(), grace_seconds=60, drain_linger_s=30)
        serving = asyncio.ensure_future(serve(cfg, servicer, stop=asyncio.Event()))
        statuses: list[int] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cfg.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=FailingServicer.service_name))

            async def follow():
                try:
                    async for reply in watch:
                        statuses.append(reply.status)
                except grpc.aio.AioRpcError:
                    pass  # the server went away

            following = asyncio.ensure_future(follow())
            deadline = time.monotonic() + 30
            while health_pb2.HealthCheckResponse.SERVING not in statuses:
                assert time.monotonic() < deadline and not serving.done()
                await asyncio.sleep(0.02)
            t0 = time.monotonic()
            servicer.failure.set()
            code = await asyncio.wait_for(serving, 30)
            took = time.monotonic() - t0
            await asyncio.wait_for(following, 10)
        return code, took, statuses, servicer.stopped

    code, took, statuses, stopped = asyncio.run(main())
    assert code == EXIT_FATAL and stopped
    assert took < FATAL_GRACE_S + 2, f"{took:.1f} s: neither the 30 s linger nor the 60 s grace should apply"
    serving = statuses.index(health_pb2.HealthCheckResponse.SERVING)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses[serving + 1:], statuses


class IdleServicer(FailingServicer):
    service_name = "test.v1.IdleService"

    async def fatal(self) -> str:
        await asyncio.Event().wait()  # never fails
        return ""


def test_a_health_watch_left_open_does_not_hold_the_drain():
    """A kubelet or a client-side health check keeps a Watch open; with nothing else in flight,
    SIGTERM's drain must not wait the whole grace period for it (it waited 10 s of 10 in CI)."""
    async def main():
        stop = asyncio.Event()
        cfg = ServerConfig(host="127.0.0.1", port=free_port(), grace_seconds=30, drain_linger_s=0)
        serving = asyncio.ensure_future(serve(cfg, IdleServicer(), stop=stop))
        statuses: list[int] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cfg.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=IdleServicer.service_name))

            async def follow():  # reads every status and never cancels
                try:
                    async for reply in watch:
                        statuses.append(reply.status)
                except grpc.aio.AioRpcError:
                    pass

            following = asyncio.ensure_future(follow())
            deadline = time.monotonic() + 30
            while health_pb2.HealthCheckResponse.SERVING not in statuses:
                assert time.monotonic() < deadline and not serving.done()
                await asyncio.sleep(0.02)
            t0 = time.monotonic()
            stop.set()
            code = await asyncio.wait_for(serving, 60)
            took = time.monotonic() - t0
            await asyncio.wait_for(following, 10)
        return code, took, statuses

    code, took, statuses = asyncio.run(main())
    assert code == 0
    assert took < 3.0, f"the drain took {took:.1f} s of its 30 s grace with only a health Watch open"
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, statuses
