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
