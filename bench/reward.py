"""Reward service vs the in-process reward model, measured in one run.

    python bench/reward.py                 # tiny model and a ~30M-parameter one, one table
    python bench/reward.py --sizes tiny --json

For each model it starts a real `rlhf serve reward` (and a second one with
dynamic batching off: --max-batch-size 1 --max-wait-ms 0) and measures, on the
same samples:

  score        gRPC Score, requests of --batch pairs one after another, vs the
               in-process batched forward (tokenize + score_batch, same batch size); target >= 0.85
  stream       ScoreStream with the same requests pipelined on one stream, vs the same baseline
  http         POST /get_reward (OpenRLHF's protocol: JSON, templated queries ending in EOS) with the same
               requests one after another, vs the same baseline: what the JSON door costs next to gRPC
  32 clients   --clients concurrent clients sending one pair each, batched server vs the server
               that handles them one at a time; target >= 4x; p50/p99 per-request latency
  ceiling      the same bursts in this process: one forward of all --clients pairs vs one forward
               per pair. No server can gain more from batching than this on the same hardware.
  peak RSS     of the batched server process over the whole run (psutil)

and, without a model, what running the user's reward functions in worker processes costs
(services.reward.workers: a time limit per call, a runaway call killed): one request of 1 and of
--batch pairs through the worker pool vs the same calls in a thread, as the server made them
before; and builtin:regex's RE2 vs Python's re on the demo responses.

ratio is wall-clock throughput (best of the runs); cpu_ratio the same with CPU seconds
(client + server processes vs this process alone), which other tenants of a shared box
do not stretch. Both sides use --threads torch threads.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import pathlib
import random
import tempfile
import threading
import time
import urllib.request

import psutil

from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command
from services.common.text import format_prompt
from services.demo.data import KINDS, all_prompts, make_answer
from services.demo.tiny_model import build_model
from services.reward.client import AsyncRewardClient, RewardClient

log = logging.getLogger("bench.reward")
SERVICE = "rlhf.v1.RewardService"
# Model shapes, and how much work each measurement does on them (the large model is ~60x
# the compute per token: fewer samples keep its rows to minutes on 2 CPU cores).
SIZES = {
    "tiny": dict(model=dict(), samples=256, rounds=10, repeats=5),
    "large": dict(model=dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536),
                  samples=64, rounds=4, repeats=4),
}


def samples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    prompts = all_prompts()
    out = []
    for _ in range(n):
        p = rng.choice(prompts)
        out.append((p, make_answer(rng.choice(KINDS), p, rng)))
    return out


class PeakRss:
    """Samples the RSS of a process every 100 ms in a thread; keeps the peak.

    One cheap psutil call per sample: the thread shares this process (and its GIL) with
    the in-process baseline, so it must not cost that baseline anything measurable."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                pass
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def openrlhf_bodies(tok, chunks) -> list[bytes]:
    """Each chunk as OpenRLHF posts it: the templated prompt + response + EOS as one query."""
    return [json.dumps({"query": [format_prompt(tok, p) + r + tok.eos_token for p, r in chunk]}).encode()
            for chunk in chunks]


def post_all(url: str, bodies: list[bytes]) -> None:
    for body in bodies:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()


def serve(model_dir: pathlib.Path, log_dir: pathlib.Path, name: str, threads: int, *extra: str,
          device: str = "cpu") -> ChildServer:
    port = free_port()
    argv = rlhf_command("serve", "reward", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                        "--metrics-port", "0", "--device", device, *extra)
    return ChildServer(argv, port=port, service=SERVICE, env={"RLHF_AUTH_TOKEN": "", "OMP_NUM_THREADS": str(threads)},
                       log_path=log_dir / f"{name}.log", ready_timeout=300)


class Meter:
    """Wall time and CPU time (user + system, all threads) of a set of processes around a call.

    The box is shared: other tenants stretch wall time but not the CPU seconds our processes
    spend, so the table shows both; best of several runs for each."""

    def __init__(self, *pids: int):
        self.procs = [psutil.Process(pid) for pid in pids]

    def cpu(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def __call__(self, fn) -> tuple[float, float]:
        c0, t0 = self.cpu(), time.perf_counter()
        fn()
        return time.perf_counter() - t0, self.cpu() - c0


class InProcess:
    """The baseline: tokenize + score_batch in batches of `batch`, in this process.

    Each batch of `batch` pairs is cut by length the way the server's batcher cuts it
    (plan_batches), so the ratio measures what the service adds, not a different padding.
    """

    def __init__(self, model_dir: pathlib.Path, batch: int, max_batch_tokens: int = 16384, device: str = "cpu"):
        from services.ml.head import load_reward_model

        self.model, self.tok, _ = load_reward_model(str(model_dir), device=device)
        self.batch, self.max_batch_tokens = batch, max_batch_tokens
        self.params = sum(p.numel() for p in self.model.parameters())

    def __call__(self, pairs, batch: int | None = None) -> None:
        from services.reward.batcher import plan_batches
        from services.ml.head import score_batch

        tok, eos = self.tok, self.tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        batch = batch or self.batch
        for i in range(0, len(pairs), batch):
            ids = [list(tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"])
                   + list(tok(r, add_special_tokens=False)["input_ids"]) + [eos] for p, r in pairs[i:i + batch]]
            for idx in plan_batches([len(x) for x in ids], batch, self.max_batch_tokens):
                score_batch(self.model, [ids[j] for j in idx], pad)


def concurrent_clients(batched: str, single: str, meters: dict, pairs, clients: int, rounds: int):
    """`clients` tasks each send one pair at once, `rounds` times, alternating between the batched
    server and the one-at-a-time server so that both see the same load from the other tenants.
    Returns {address: (best pairs/s, best pairs per CPU second, latencies in s)}."""

    async def main():
        async with AsyncRewardClient(batched, ClientConfig()) as b, AsyncRewardClient(single, ClientConfig()) as s:
            for c in (b, s):
                await c.scores(pairs[:1])

            async def one(c, pair, latencies):
                t0 = time.perf_counter()
                await c.scores([pair])
                latencies.append(time.perf_counter() - t0)

            stats = {a: dict(latencies=[], wall=math.inf, cpu=math.inf) for a in (batched, single)}
            for r in range(rounds):
                chunk = [pairs[(r * clients + i) % len(pairs)] for i in range(clients)]
                for address, c in ((batched, b), (single, s)):
                    st, meter = stats[address], meters[address]
                    c0, t0 = meter.cpu(), time.perf_counter()
                    await asyncio.gather(*(one(c, p, st["latencies"]) for p in chunk))
                    st["wall"] = min(st["wall"], time.perf_counter() - t0)
                    st["cpu"] = min(st["cpu"], meter.cpu() - c0)
            return {a: (clients / st["wall"], clients / st["cpu"], st["latencies"]) for a, st in stats.items()}

    return asyncio.run(main())


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def bench_model(name: str, model_dir: pathlib.Path, log_dir: pathlib.Path, args) -> list[dict]:
    pairs = samples(args.samples)
    chunks = [pairs[i:i + args.batch] for i in range(0, len(pairs), args.batch)]
    base = InProcess(model_dir, args.batch, device=args.device)
    label = f"{name} ({base.params / 1e6:.1f}M params)"
    rows = []
    http_port = free_port()
    bodies = openrlhf_bodies(base.tok, chunks)
    with serve(model_dir, log_dir, f"{name}-batched", args.threads, "--http-port", str(http_port),
               device=args.device) as fast, \
            serve(model_dir, log_dir, f"{name}-unbatched", args.threads, "--max-batch-size", "1", "--max-wait-ms", "0",
                  device=args.device) as slow, \
            PeakRss(fast.pid) as rss, RewardClient(fast.address, ClientConfig()) as client:
        # CPU counted: this process alone for the baseline; this process (the client) + the server otherwise.
        here, service = Meter(os.getpid()), Meter(os.getpid(), fast.pid)
        runs = {
            "in-process": (here, lambda: base(pairs)),
            "Score": (service, lambda: [client.score(ch) for ch in chunks]),
            "ScoreStream": (service, lambda: list(client.score_stream(chunks))),
            "HTTP": (service, lambda: post_all(f"http://127.0.0.1:{http_port}/get_reward", bodies)),
        }
        for _, fn in runs.values():
            fn()  # warm-up: connections, first forward, allocator
        # Interleaved, best of `repeats`: drift in the load of the shared box would otherwise
        # favour whichever ran in a quiet moment.
        wall, cpu = dict.fromkeys(runs, math.inf), dict.fromkeys(runs, math.inf)
        for r in range(args.repeats):
            for key, (meter, fn) in runs.items():
                w, c = meter(fn)
                wall[key], cpu[key] = min(wall[key], w), min(cpu[key], c)
            log.info("%s: repeat %d/%d: %s", label, r + 1, args.repeats,
                     ", ".join(f"{k} {len(pairs) / v:.1f} pairs/s" for k, v in wall.items()))
        # The most batching can give on this hardware: the same bursts in-process, one
        # forward for all of a burst's pairs vs one forward per pair.
        bursts = [pairs[(r * args.clients) % len(pairs):][:args.clients] for r in range(args.rounds)]
        ceiling = {b: min(here(lambda: [base(burst, batch=b) for burst in bursts])[0] for _ in range(args.repeats))
                   for b in (args.clients, 1)}
        log.info("%s: %d concurrent clients x %d rounds, batched vs one at a time", label, args.clients, args.rounds)
        conc = concurrent_clients(fast.address, slow.address,
                                  {fast.address: service, slow.address: Meter(os.getpid(), slow.pid)},
                                  pairs, args.clients, args.rounds)
    (batched, batched_cpu, lat_b), (single, single_cpu, lat_s) = conc[fast.address], conc[slow.address]
    rate = {k: len(pairs) / v for k, v in wall.items()}
    rate_cpu = {k: len(pairs) / v for k, v in cpu.items()}
    ms = lambda xs, q: round(1000 * percentile(xs, q), 1)  # noqa: E731
    for key, case in (("Score", f"gRPC Score ({args.batch} pairs/request) vs in-process batched forward"),
                      ("ScoreStream", "gRPC ScoreStream (pipelined) vs in-process batched forward"),
                      ("HTTP", f"HTTP POST /get_reward ({args.batch} queries/request) vs in-process batched forward")):
        rows.append(dict(model=label, case=case, service=round(rate[key], 1), baseline=round(rate["in-process"], 1),
                         unit="pairs/s", ratio=round(rate[key] / rate["in-process"], 2),
                         cpu_ratio=round(rate_cpu[key] / rate_cpu["in-process"], 2), target=">= 0.85"))
    rows.append(dict(model=label, case=f"{args.clients} concurrent clients x 1 pair: batched vs one at a time",
                     service=round(batched, 1), baseline=round(single, 1), unit="pairs/s",
                     ratio=round(batched / single, 2), cpu_ratio=round(batched_cpu / single_cpu, 2), target=">= 4",
                     p50_ms=ms(lat_b, 50), p99_ms=ms(lat_b, 99), baseline_p50_ms=ms(lat_s, 50),
                     baseline_p99_ms=ms(lat_s, 99)))
    burst_pairs = args.clients * args.rounds
    rows.append(dict(model=label, case=f"ceiling of the row above: in-process forward of {args.clients} pairs "
                                       f"at once vs one at a time",
                     service=round(burst_pairs / ceiling[args.clients], 1), baseline=round(burst_pairs / ceiling[1], 1),
                     unit="pairs/s", ratio=round(ceiling[1] / ceiling[args.clients], 2)))
    rows.append(dict(model=label, case="server peak RSS (batched server, whole run)",
                     service=round(rss.peak / 2**20, 1), unit="MiB"))
    return rows


RULES = "def words(prompt, response):\n    return float(len(response.split()))\n"


def bench_functions(args) -> list[dict]:
    """Rows: a request's reward function calls through the worker pool vs in a thread (the server's
    way before the pool), per request; RE2 vs Python re for a format regex, per response."""
    import concurrent.futures
    import re
    import sys

    from services.reward.rules import load_function
    from services.reward.workers import FunctionPool

    with tempfile.TemporaryDirectory() as tmp:
        pathlib.Path(tmp, "bench_rules.py").write_text(RULES)
        sys.path.insert(0, tmp)
        try:
            functions = [load_function("words=bench_rules:words")]
            return asyncio.run(_functions(functions, FunctionPool, concurrent.futures, args)) + _regex_row(re, args)
        finally:
            sys.path.remove(tmp)


async def _functions(functions, FunctionPool, futures, args) -> list[dict]:
    pool = FunctionPool(functions, workers=4, time_limit_s=5.0)
    threads = futures.ThreadPoolExecutor(4)  # what the scorer ran the functions on before
    loop = asyncio.get_running_loop()
    await pool.start()
    rows = []
    try:
        for n in (1, args.batch):
            texts = [(p, r, f"pairs[{i}]") for i, (p, r) in enumerate(samples(n, seed=n))]

            def in_thread():
                return [[f(p, r, name) for f in functions] for p, r, name in texts]

            async def thread_call():
                return await loop.run_in_executor(threads, in_thread)

            calls = max(50, 2000 // n)
            best = {}
            for _ in range(args.repeats or 5):  # interleaved, best of the repeats
                for key, call in (("in-thread", thread_call), ("worker process", lambda: pool.apply(texts))):
                    assert await call() == in_thread()
                    start = time.perf_counter()
                    for _ in range(calls):
                        await call()
                    best[key] = min(best.get(key, math.inf), (time.perf_counter() - start) / calls)
            us = {k: v * 1e6 for k, v in best.items()}
            rows.append(dict(model="(reward functions)", case=f"module:function on {n} pair{'s' * (n > 1)} per request: "
                                                              f"worker process vs in a thread (before)",
                             service=round(us["worker process"], 1), baseline=round(us["in-thread"], 1),
                             unit="us/request", ratio=round(us["worker process"] / us["in-thread"], 2),
                             overhead_us=round(us["worker process"] - us["in-thread"], 1)))
    finally:
        threads.shutdown()
        await pool.stop()
    return rows


def _regex_row(re, args) -> list[dict]:
    from services.reward.rules import load_function

    pattern = r"[A-Z].*[.!?]"  # a format reward: capitalised, ends a sentence (. across lines: the whole text)
    responses = [r for _, r in samples(512)]
    ours, python = load_function(f"f=builtin:regex:{pattern}").fn, re.compile(pattern, re.DOTALL)
    assert [ours("", r) for r in responses] == [1.0 if python.fullmatch(r) else 0.0 for r in responses]
    best = {}
    for _ in range(args.repeats or 5):
        for key, fn in (("re2", lambda r: ours("", r)), ("re", python.fullmatch)):
            start = time.perf_counter()
            for r in responses:
                fn(r)
            best[key] = min(best.get(key, math.inf), (time.perf_counter() - start) / len(responses))
    return [dict(model="(reward functions)", case="builtin:regex, RE2 (now) vs Python re (before), one response",
                 service=round(best["re2"] * 1e6, 2), baseline=round(best["re"] * 1e6, 2), unit="us/response",
                 ratio=round(best["re2"] / best["re"], 2))]


def print_table(rows: list[dict]) -> None:
    cols = ["model", "case", "service", "baseline", "unit", "ratio", "cpu_ratio", "target", "p50_ms", "p99_ms",
            "baseline_p50_ms", "baseline_p99_ms", "overhead_us"]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,large", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--models-dir", default=None, help="where to build the models (default: a temporary directory)")
    p.add_argument("--samples", type=int, default=None, help="pairs scored per measurement (default: per size)")
    p.add_argument("--batch", type=int, default=64, help="pairs per Score request and per in-process forward")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rounds", type=int, default=None, help="bursts of --clients requests (default: per size)")
    p.add_argument("--repeats", type=int, default=None, help="throughput runs, the best one counts (default: per size)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, here and in the servers (OMP_NUM_THREADS); on a shared 2-core box "
                        "more threads than free cores makes every forward several times slower")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="of the servers and the in-process baseline")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--functions-only", action="store_true",
                   help="only the reward function rows (worker processes vs a thread, RE2 vs re): no model, seconds")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads, as in the servers
    import torch

    torch.set_num_threads(args.threads)  # the in-process baseline runs with what the servers get
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.models_dir or tmp)
        rows = []
        for name in ([] if args.functions_only else args.sizes.split(",")):
            model_dir = root / f"reward-{name}"
            if not (model_dir / "config.json").exists():
                log.info("building %s reward model in %s", name, model_dir)
                build_model("reward", model_dir, seed=0, **SIZES[name]["model"])
            work = {k: getattr(args, k) or SIZES[name][k] for k in ("samples", "rounds", "repeats")}
            rows += bench_model(name, model_dir, pathlib.Path(tmp), argparse.Namespace(**{**vars(args), **work}))
        rows += bench_functions(args)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
