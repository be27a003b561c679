"""Bounded load on the reward or policy service over loopback: N asyncio gRPC clients
sending back to back for a fixed duration (and at most a fixed request count), then stop.

    python bench/load.py reward --clients 64 --duration 60          # starts a tiny server itself
    python bench/load.py policy --clients 64 --duration 60
    python bench/load.py reward --target 127.0.0.1:50052 --pid 1234 --json

It first runs one client for a few seconds (the unloaded baseline), then the N clients,
and prints requests, status codes, p50/p99 latency, the ratio of loaded to unloaded p50,
and the resident memory of the server's process tree (psutil) before, during and after.
The reliability tests (tests/reliability) call `run_load` directly.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import pathlib
import random
import sys
import tempfile
import time

import grpc

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig

log = logging.getLogger("bench.load")
CLIENTS_PER_CHANNEL = 16  # several HTTP/2 connections, as many client processes would open

PROMPTS = ["How do I prepare for my calculus exam?", "Write a haiku about the sea.", "What is 17 times 23?",
           "Give me three tips to sleep better.", "Explain what a reward model is.", "Translate 'good night' to French."]
ANSWERS = ["Review the chapters, then practice old exams.", "Waves fold into foam.", "391.",
           "Keep a schedule, avoid screens, and keep the room cool.", "A model that scores responses.", "Bonne nuit."]


def reward_request(rng: random.Random, pairs: int) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(pairs=[
        reward_pb2.ScorePair(prompt=common_pb2.TextOrTokens(text=rng.choice(PROMPTS)),
                             response=common_pb2.TextOrTokens(text=rng.choice(ANSWERS)))
        for _ in range(pairs)])


def policy_request(rng: random.Random, max_tokens: int) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(
        prompts=[common_pb2.TextOrTokens(text=rng.choice(PROMPTS))],
        params=policy_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def tree_rss(pid: int | None) -> int:
    if not pid:
        return 0
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


async def run_load(target: str, service: str, *, clients: int, duration: float, max_requests: int | None = None,
                   timeout: float = 30.0, config: ClientConfig | None = None, pid: int | None = None,
                   warmup: float = 10.0, pairs: int = 4, max_tokens: int = 8, seed: int = 0) -> dict:
    """`clients` loops sending one request after another until `duration` seconds or
    `max_requests` requests in all. Never retries (a refused request counts as refused).
    RSS of `pid`'s tree is sampled every 0.5 s; `rss_warm` is taken `warmup` s in."""
    rng = random.Random(seed)
    channels = [create_channel(target, config or ClientConfig(), aio=True)
                for _ in range(max(1, math.ceil(clients / CLIENTS_PER_CHANNEL)))]
    if service == "reward":
        stubs = [reward_pb2_grpc.RewardServiceStub(c) for c in channels]
        make, method = (lambda: reward_request(rng, pairs)), "Score"
    elif service == "policy":
        stubs = [policy_pb2_grpc.PolicyServiceStub(c) for c in channels]
        make, method = (lambda: policy_request(rng, max_tokens)), "Generate"
    else:
        raise ValueError(f"service must be reward or policy, got {service!r}")

    latencies: dict[str, list[float]] = collections.defaultdict(list)
    details: dict[str, str] = {}
    sent = 0
    rss: list[tuple[float, int]] = []
    rss_before = tree_rss(pid)
    start = time.perf_counter()
    end = start + duration

    async def client(i: int) -> None:
        nonlocal sent
        call = getattr(stubs[i % len(stubs)], method)
        while time.perf_counter() < end and (max_requests is None or sent < max_requests):
            sent += 1
            t0 = time.perf_counter()
            try:
                await call(make(), timeout=timeout)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                details.setdefault(code, e.details() or "")
            latencies[code].append(time.perf_counter() - t0)

    async def sample() -> None:
        while True:
            rss.append((time.perf_counter() - start, tree_rss(pid)))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample()) if pid else None
    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        if sampler:
            sampler.cancel()
        for c in channels:
            await c.close()
    elapsed = time.perf_counter() - start
    ok = latencies.get("OK", [])
    warm = [b for t, b in rss if t >= warmup]
    result = dict(
        service=service, clients=clients, duration_s=round(elapsed, 2), requests=sent,
        codes={k: len(v) for k, v in sorted(latencies.items())}, details=details,
        ok=len(ok), errors=sent - len(ok), rps=round(len(ok) / elapsed, 1),
        p50_ms=round(percentile(ok, 50) * 1000, 1), p99_ms=round(percentile(ok, 99) * 1000, 1),
        p50_ms_by_code={k: round(percentile(v, 50) * 1000, 1) for k, v in latencies.items()},
        p99_ms_by_code={k: round(percentile(v, 99) * 1000, 1) for k, v in latencies.items()},
        max_ms_by_code={k: round(max(v) * 1000, 1) for k, v in latencies.items()},
    )
    if pid:
        result.update(rss_before=rss_before, rss_warm=warm[0] if warm else rss_before,
                      rss_max_after_warmup=max(warm) if warm else rss_before,
                      rss_max=max((b for _, b in rss), default=rss_before), rss_end=tree_rss(pid))
    return result


def _own_server(service: str, tmp: pathlib.Path):
    """A tiny model and its real server, for a run without --target."""
    from services.demo.launch import ChildServer, free_port, rlhf_command
    from services.demo.tiny_model import build_model

    model = build_model(service, tmp / service, seed=0)
    port = free_port()
    argv = rlhf_command("serve", service, "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                        "--metrics-port", "0")
    if service == "policy":
        argv += ["--kv-cache-gib", "1"]
    return ChildServer(argv, port=port, service=f"rlhf.v1.{service.capitalize()}Service",
                       env={"VLLM_CPU_KVCACHE_SPACE": "1"}, log_path=tmp / f"{service}.log")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("service", choices=["reward", "policy"])
    p.add_argument("--target", help="host:port of a running server (default: start a tiny one)")
    p.add_argument("--pid", type=int, help="server pid, for its RSS (default: the server started here)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=None, help="stop after this many requests in all")
    p.add_argument("--baseline-seconds", type=float, default=5.0, help="seconds of one client before the load")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each request, seconds")
    p.add_argument("--pairs", type=int, default=4, help="pairs per Score request")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per Generate request")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        target, pid = args.target, args.pid
        if target is None:
            server = stack.enter_context(_own_server(args.service, pathlib.Path(tmp)))
            target, pid = server.address, server.pid
        config = ClientConfig.from_env()
        common = dict(config=config, timeout=args.timeout, pairs=args.pairs, max_tokens=args.max_tokens)
        log.info("baseline: 1 client for %.0f s", args.baseline_seconds)
        base = asyncio.run(run_load(target, args.service, clients=1, duration=args.baseline_seconds, **common))
        log.info("load: %d clients for %.0f s", args.clients, args.duration)
        loaded = asyncio.run(run_load(target, args.service, clients=args.clients, duration=args.duration,
                                      max_requests=args.max_requests, pid=pid,
                                      warmup=min(10.0, args.duration / 4), **common))
        time.sleep(2)
        loaded["rss_after"] = tree_rss(pid)
    ratio = loaded["p50_ms"] / base["p50_ms"] if base["p50_ms"] else float("nan")
    if args.json:
        print(json.dumps(dict(baseline=base, load=loaded, p50_ratio=ratio), indent=2))
        return 0
    print(f"{args.service}: 1 client  p50 {base['p50_ms']} ms  p99 {base['p99_ms']} ms  {base['rps']} req/s")
    print(f"{args.service}: {args.clients} clients for {loaded['duration_s']} s: {loaded['requests']} requests, "
          f"codes {loaded['codes']}, p50 {loaded['p50_ms']} ms, p99 {loaded['p99_ms']} ms, {loaded['rps']} req/s "
          f"({loaded['rps'] / base['rps'] if base['rps'] else float('nan'):.1f}x the single client's throughput, "
          f"p50 {ratio:.1f}x)")
    if pid:
        m = lambda b: f"{b / (1 << 20):.0f} MiB"  # noqa: E731
        print(f"RSS of the server tree: before {m(loaded['rss_before'])}, after warm-up {m(loaded['rss_warm'])}, "
              f"max after warm-up {m(loaded['rss_max_after_warmup'])}, after {m(loaded['rss_after'])}")
    return 0 if loaded["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
