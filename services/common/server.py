"""The server runtime every service runs on.

    sys.exit(run(ServerConfig.from_args(args), servicer))

A servicer is the service's transport object: `service_name` (e.g.
"rlhf.v1.RewardService"), `add_to_server(server)`, `async start()` (load the model)
and `async stop()` (release it). Optionally `admin_token` and `admin_methods`, methods
("pkg.Service/Method") that only that token may call (see ServerInterceptor); and `async
fatal()`, which returns (a reason) once the servicer can never serve again, say because its
engine died: the runtime then
turns health NOT_SERVING, stops, and the process exits 1 so that its supervisor
(Kubernetes) restarts it. The runtime adds everything else: health per service,
reflection, auth, metrics (rlhf_build_info included), TLS, keepalive, size limits and
the SIGTERM drain.
"""
from __future__ import annotations

import asyncio
import http.server
import importlib.metadata
import threading
import logging
import os
import pathlib
import platform
import signal
import sys
from typing import Protocol

import grpc
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.channel import channel_options
from services.common.config import ServerConfig
from services.common.interceptor import ServerInterceptor

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FATAL_GRACE_S = 2.0  # after a fatal failure: long enough for calls in flight to get their error
EXIT_FATAL = 1
STOP_GRACE_S = 1.0  # for grpc's own stop, once the RPCs we handle have finished (see serve())

BUILD_INFO = prometheus_client.Gauge("rlhf_build_info", "Always 1; the labels say what runs.",
                                     ["service", "version", "python_version", "grpc_version"])


def _version() -> str:
    try:
        return importlib.metadata.version("rlhf-services")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


class Servicer(Protocol):
    service_name: str

    def add_to_server(self, server: grpc.aio.Server) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def _server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    if not cfg.tls_cert:
        return None
    if not cfg.tls_key:
        raise SystemExit("--tls-cert needs --tls-key")
    read = lambda p: pathlib.Path(p).read_bytes()  # noqa: E731
    ca = read(cfg.tls_ca) if cfg.tls_ca else None
    return grpc.ssl_server_credentials([(read(cfg.tls_key), read(cfg.tls_cert))],
                                       root_certificates=ca, require_client_auth=ca is not None)


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """GET /metrics in Prometheus' classic text format, whatever the scraper's Accept header asks.

    prometheus_client answers a scraper that asks for OpenMetrics 1.0 (Prometheus 2.x does) with
    names outside the legacy character set escaped, so vLLM's `vllm:num_requests_running` arrives
    as `vllm_num_requests_running` there and as itself elsewhere. The text format keeps every
    name as the code registers it, for every Prometheus, and the dashboard's queries hold."""

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.split("?")[0] not in ("/", "/metrics"):
            self.send_error(404)
            return
        body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
        self.send_response(200)
        self.send_header("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # one line per scrape is noise
        pass


def serve_metrics(host: str, port: int) -> http.server.ThreadingHTTPServer:
    """The /metrics endpoint on a daemon thread."""
    server = http.server.ThreadingHTTPServer((host, port), _MetricsHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


async def serve(cfg: ServerConfig, servicer: Servicer, stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT, or until `stop` is set when the caller owns the signals.
    Returns the process's exit code: 0, or EXIT_FATAL after a fatal failure."""
    interceptor = ServerInterceptor(cfg.auth_token, getattr(servicer, "admin_token", None),
                                    getattr(servicer, "admin_methods", ()))
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=channel_options(cfg.max_message_bytes) + [
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
    )
    servicer.add_to_server(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [servicer.service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    for name in ("", servicer.service_name):
        await health.set(name, NOT_SERVING)
    short_name = servicer.service_name.rsplit(".", 1)[-1].removesuffix("Service").lower()
    BUILD_INFO.labels(short_name, _version(), platform.python_version(), grpc.__version__).set(1)

    address = f"{cfg.host}:{cfg.port}"
    creds = _server_credentials(cfg)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"could not bind {address}")
    if cfg.metrics_port:
        serve_metrics(cfg.host, cfg.metrics_port)
    await server.start()
    log.info("%s listening on %s:%d (metrics %s, auth %s, tls %s)", servicer.service_name, cfg.host, port,
             cfg.metrics_port or "off", "on" if cfg.auth_token else "off",
             "mtls" if cfg.tls_ca else "on" if creds else "off")

    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)

    # Load the model while health says NOT_SERVING, unless a signal comes first.
    starting = asyncio.ensure_future(servicer.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    exit_code, linger, grace = 0, cfg.drain_linger_s, cfg.grace_seconds
    if starting.done():
        starting.result()  # a failed load ends the process with its traceback
        interceptor.ready = True
        for name in ("", servicer.service_name):
            await health.set(name, SERVING)
        log.info("%s serving", servicer.service_name)
        fatal = getattr(servicer, "fatal", None)
        failed = asyncio.ensure_future(fatal() if fatal else asyncio.Event().wait())
        await asyncio.wait([stopping, failed], return_when=asyncio.FIRST_COMPLETED)
        if failed.done():
            reason = failed.exception() or failed.result()
            log.error("%s cannot serve any more: %s; stopping", servicer.service_name, reason)
            exit_code, linger, grace = EXIT_FATAL, 0.0, min(grace, FATAL_GRACE_S)
        else:
            failed.cancel()
    else:
        starting.cancel()

    # Drain: probes see NOT_SERVING first. With a linger, new RPCs are still served
    # normally meanwhile, while load balancers take this replica out of rotation (their
    # late requests would otherwise race the final stop, which cancels what gRPC has not
    # dispatched yet: grpc/grpc#41785). Then new RPCs are refused and those in flight get
    # the grace period.
    log.info("draining %s (linger %.1f s, grace %.0f s)", servicer.service_name, linger, grace)
    await health.enter_graceful_shutdown()
    if linger > 0:
        await asyncio.sleep(linger)
    # Refuse new RPCs ourselves (UNAVAILABLE, retried by clients) while grpc keeps dispatching
    # what it already received, and let the RPCs in flight finish; server.stop() would cancel
    # calls received but not yet dispatched.
    interceptor.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    await asyncio.sleep(0.1)
    while interceptor.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if interceptor.in_flight:
        log.warning("%d RPCs still running after the %.0f s grace period, cancelled: %s", interceptor.in_flight,
                    grace, ", ".join(sorted(map(str, interceptor.active))))
    # What is left is not ours to wait for: health Watch streams (a kubelet, a load balancer or
    # a client-side health check keeps one open for as long as we let it) and refusals on their
    # way out. A stream left open held the exit for the whole grace period.
    started = loop.time()
    await server.stop(min(STOP_GRACE_S, max(0.0, deadline - loop.time())))
    log.debug("grpc server stopped in %.2f s", loop.time() - started)
    await servicer.stop()
    log.info("%s stopped", servicer.service_name)
    return exit_code


def run(cfg: ServerConfig, servicer: Servicer) -> int:
    code = asyncio.run(serve(cfg, servicer))
    if code == EXIT_FATAL:
        # Once vLLM's engine core had died, the interpreter's own teardown (garbage
        # collection of module state) took ~9 s more here. Nothing is left to clean up and
        # the supervisor is waiting to restart us: leave now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


class BackgroundServer:
    """The runtime on a thread of its own, for a process whose main thread does the real
    work and owns the signals (the trainer)."""

    def __init__(self, cfg: ServerConfig, servicer: Servicer):
        self.cfg, self.servicer = cfg, servicer
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=f"{servicer.service_name}-server", daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            self._stop = asyncio.Event()
            self._started.set()
            await serve(self.cfg, self.servicer, self._stop)

        self.loop.run_until_complete(main())

    def start(self) -> "BackgroundServer":
        self._thread.start()
        self._started.wait()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(self.cfg.drain_linger_s + self.cfg.grace_seconds + 10)
