"""services.common.server.serve, in process, with a servicer that reports a fatal failure:
health turns NOT_SERVING and serve returns the non-zero exit code promptly, without the
drain's grace period. (The policy's real case, a killed vLLM engine core, is in
tests/reliability/test_reliability_policy.py.) And the drain after SIGTERM does not wait
its grace period for a health Watch that a client keeps open."""
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
        self.failure = asyncio.Event()  # fatal() returns: the service cannot serve any more
        self.stop_event = asyncio.Event()  # SIGTERM
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


class IdleServicer(FailingServicer):
    service_name = "test.v1.IdleService"

    async def fatal(self) -> str:
        await asyncio.Event().wait()  # never fails
        return ""


def serve_until(servicer, cfg: ServerConfig, end) -> tuple[int, float, list[int]]:
    """Serve `servicer` with a health Watch open (read to its end, never cancelled); once it
    says SERVING, call end() and wait for serve() to return: (exit code, seconds it took after
    end(), the statuses the Watch saw)."""
    async def main():
        serving = asyncio.ensure_future(serve(cfg, servicer, stop=servicer.stop_event))
        statuses: list[int] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cfg.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=servicer.service_name))

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
            end()
            code = await asyncio.wait_for(serving, 60)
            took = time.monotonic() - t0
            await asyncio.wait_for(following, 10)
        return code, took, statuses

    return asyncio.run(main())


def test_a_fatal_failure_turns_health_not_serving_and_exits_non_zero():
    servicer = FailingServicer()
    cfg = ServerConfig(host="127.0.0.1", port=free_port(), grace_seconds=60, drain_linger_s=30)
    code, took, statuses = serve_until(servicer, cfg, servicer.failure.set)
    assert code == EXIT_FATAL and servicer.stopped
    assert took < FATAL_GRACE_S + 2, f"{took:.1f} s: neither the 30 s linger nor the 60 s grace should apply"
    serving = statuses.index(health_pb2.HealthCheckResponse.SERVING)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses[serving + 1:], statuses


def test_a_health_watch_left_open_does_not_hold_the_drain():
    """A kubelet or a client-side health check keeps a Watch open; with nothing else in flight,
    SIGTERM's drain must not wait the whole grace period for it (it waited 10 s of 10 in CI)."""
    servicer = IdleServicer()
    cfg = ServerConfig(host="127.0.0.1", port=free_port(), grace_seconds=30, drain_linger_s=0)
    code, took, statuses = serve_until(servicer, cfg, servicer.stop_event.set)
    assert code == 0 and servicer.stopped
    assert took < 3.0, f"the drain took {took:.1f} s of its 30 s grace with only a health Watch open"
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, statuses
