"""PolicyService benchmark: each figure next to its baseline, measured in the same run.

    python bench/policy.py              # the tiny model (seconds)
    python bench/policy.py --large      # also a ~344 MB model (86M params, float32), and its deltas
    python bench/policy.py --fleet      # also trainer egress and time to all for 1, 2 and 4 replicas
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

Weight path rows (--large: the 86M model served in bf16, as replicas serve; the trainer's
side in this process, world of one, services.trainer.image):
  delta lr    after one AdamW step at lr 1e-6 and at 3e-5 (fresh optimizer, one LM batch):
              changed share; wire bytes of the delta push  vs  the changed elements' bytes
              (target <= 1.3); seconds end to end (encode + stream + stage + apply)  vs  a full
              push of the same weights; apply seconds  vs  the full push's; the efficiency: the
              image's bytes over the delta's seconds  vs  raw loopback TCP
  partial     apply seconds of a push changing 5% of the tensors (every 20th, by one ulp)  vs
              a full apply (target <= 0.3); and of a push changing 5% of the elements spread
              over every tensor (no target: every layer is touched, so reloaded)
  fleet (--fleet, tiny replicas, bf16): for R = 1, 2, 4, a full push through one relayed stream:
              trainer egress (bytes it sent)  vs  the payload (target <= 1.1); seconds until every
              replica answered  vs  R separate streams from the trainer (the way before relays)
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


# ---- the weight path ------------------------------------------------------------------------

def _trainer(model_dir: str, dtype: str, version: int):
    """The trainer's side in this process: the policy in fp32 and its served image."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer import distributed
    from services.trainer.image import ServedImage

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    image = ServedImage(model, distributed.init("cpu", "float32"), dtype)
    image.snapshot(version)
    return model, image


def _adamw_step(model, lr: float, seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.randint(4, model.config.vocab_size, (4, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _push_full(clients, targets, image, version, fanout=1):
    from services.policy.client import PushOptions, TensorRef
    from services.trainer import push

    refs = [TensorRef(name, image.shapes[name], lambda t=t: t) for name, t in image.full()]
    return push.stream(clients, targets, lambda: refs, version, image.dtype_name,
                       PushOptions(full=True, image_digest=image.digest), fanout, retry=False)


def _push_delta(clients, targets, image, delta):
    from services.policy.client import PushOptions
    from services.trainer import push

    options = PushOptions(full=False, delta_base=delta.base_version, base_digest=delta.base_digest,
                          image_digest=delta.image_digest)
    return push.stream(clients, targets, lambda: push.delta_refs(delta.entries, delta.shapes), delta.version,
                       image.dtype_name, options, 1, retry=False)


def _ok(sent) -> None:
    bad = {a: (o.code, o.message) for a, o in sent.outcomes.items() if not o.ok}
    if bad:
        raise RuntimeError(f"push refused: {bad}")


def _nudge(image, names: list[str], share: float, seed: int) -> None:
    """Move `share` of the elements of each named parameter by one bf16 ulp (in the model, so
    the next advance() sees them changed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in image.model.named_parameters():
            if name in names:
                mask = torch.rand(p.shape, generator=g) < share
                p[mask] = (p[mask].to(torch.bfloat16).view(torch.int16) + 1).view(torch.bfloat16).float()


def bench_deltas(root: str, reps: int = 3) -> list[dict]:
    """Full and delta pushes of the 86M model served in bf16, apply of partial pushes."""
    import time as _time

    from services.demo.launch import ChildServer, free_port, rlhf_command
    from services.policy.client import PolicyClient

    model_dir = build(root, LARGE, 0)
    port = free_port()
    argv = rlhf_command("serve", "policy", *serve_args(model_dir, "bfloat16"), "--host", "127.0.0.1", "--port",
                        str(port), "--metrics-port", "0")
    rows = []
    with ChildServer(argv, port=port, service="rlhf.v1.PolicyService", env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                     log_path=os.path.join(root, "server_deltas.log")) as server, \
            PolicyClient(server.address, timeout=600) as client:
        clients, target = {server.address: client}, [server.address]
        version = client.model_info().weight_version + 1
        model, image = _trainer(model_dir, "bfloat16", version)
        sent = _push_full(clients, target, image, version)
        _ok(sent)
        image_bytes = image.elements * 2
        for lr in (1e-6, 3e-5):
            _adamw_step(model, lr)
            version += 1
            t0 = _time.perf_counter()
            delta = image.advance(version)
            sent = _push_delta(clients, target, image, delta)
            delta_seconds = _time.perf_counter() - t0
            _ok(sent)
            o = sent.outcomes[server.address]
            changed_bytes = delta.changed * 2
            version += 1  # the same weights again, whole: the baseline
            t0 = _time.perf_counter()
            full = _push_full(clients, target, image, version)
            full_seconds = _time.perf_counter() - t0
            _ok(full)
            image.version = version  # the same image, under the version the replica now serves
            f = full.outcomes[server.address]
            tcp = loopback_bandwidth(max(image_bytes, 256 << 20))
            log.info("[86M bf16] lr %g: %.2f%% changed, delta %.1f MB (%.2f s: encode %.2f s, stage %.2f s, apply "
                     "%.3f s), full %.1f MB (%.2f s, apply %.3f s)", lr, 100 * delta.changed / delta.elements,
                     sent.sent_bytes / 1e6, delta_seconds, delta.encode_seconds, o.stage_seconds, o.apply_seconds,
                     full.sent_bytes / 1e6, full_seconds, f.apply_seconds)
            tag = f"86M bf16, lr {lr:g}"
            rows += [
                dict(model=tag, metric="changed share", value=delta.changed / delta.elements, baseline=1.0,
                     baseline_name="a full push", ratio=delta.changed / delta.elements, target=None),
                dict(model=tag, metric="delta wire MB", value=sent.sent_bytes / 1e6, baseline=changed_bytes / 1e6,
                     baseline_name="changed elements' bytes", ratio=sent.sent_bytes / max(changed_bytes, 1),
                     target=1.3),
                dict(model=tag, metric="delta push s (end to end)", value=delta_seconds, baseline=full_seconds,
                     baseline_name=f"full push of the same weights ({full.sent_bytes / 1e6:.0f} MB)",
                     ratio=delta_seconds / full_seconds, target=None),
                dict(model=tag, metric="delta apply s", value=o.apply_seconds, baseline=f.apply_seconds,
                     baseline_name="the full push's apply", ratio=o.apply_seconds / f.apply_seconds, target=None),
                dict(model=tag, metric="delta: image MB/s (image / end to end s)",
                     value=image_bytes / delta_seconds / 1e6, baseline=tcp / 1e6,
                     baseline_name="raw loopback TCP", ratio=image_bytes / delta_seconds / tcp, target=None),
            ]
        # Apply only what changed: 5% of the tensors, against a full apply (medians of `reps`).
        names = list(image.shapes)
        few = names[::20]
        applies = {"few": [], "spread": [], "full": []}
        for i in range(reps):
            for kind in ("few", "spread", "full"):
                version += 1
                if kind == "full":
                    sent = _push_full(clients, target, image, version)
                    image.version = version
                else:
                    _nudge(image, few if kind == "few" else names, 1.0 if kind == "few" else 0.05, seed=i)
                    sent = _push_delta(clients, target, image, image.advance(version))
                _ok(sent)
                applies[kind].append(sent.outcomes[server.address].apply_seconds)
        med = {k: sorted(v)[len(v) // 2] for k, v in applies.items()}
        log.info("[86M bf16] apply: %d of %d tensors %.3f s, 5%% of elements everywhere %.3f s, full %.3f s",
                 len(few), len(names), med["few"], med["spread"], med["full"])
        rows += [
            dict(model="86M bf16", metric=f"apply s, 5% of tensors ({len(few)}/{len(names)}) changed",
                 value=med["few"], baseline=med["full"], baseline_name=f"full apply, median of {reps}",
                 ratio=med["few"] / med["full"], target=0.3),
            dict(model="86M bf16", metric="apply s, 5% of elements in every tensor", value=med["spread"],
                 baseline=med["full"], baseline_name=f"full apply, median of {reps}",
                 ratio=med["spread"] / med["full"], target=None),
        ]
        del model, image
    return rows


def bench_fleet(root: str, counts=(1, 2, 4)) -> list[dict]:
    """Trainer egress and time to all replicas, one relayed stream vs one stream per replica."""
    import time as _time
    from concurrent.futures import ThreadPoolExecutor

    from services.demo.launch import ChildServer, free_port, rlhf_command
    from services.policy.client import PolicyClient

    model_dir = build(root, SMALL, 0)
    servers = []
    for i in range(max(counts)):
        port = free_port()
        argv = rlhf_command("serve", "policy", *serve_args(model_dir, "bfloat16"), "--host", "127.0.0.1", "--port",
                            str(port), "--metrics-port", "0")
        servers.append(ChildServer(argv, port=port, service="rlhf.v1.PolicyService",
                                   env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                                   log_path=os.path.join(root, f"server_fleet_{i}.log")))
    rows = []
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        clients = {s.address: PolicyClient(s.address, timeout=600) for s in servers}
        version = max(c.model_info().weight_version for c in clients.values()) + 1
        _, image = _trainer(model_dir, "bfloat16", version)
        _ok(_push_full(clients, list(clients), image, version))  # warm up every replica and both paths
        for r in counts:
            targets = [s.address for s in servers[:r]]
            version += 1
            t0 = _time.perf_counter()
            sent = _push_full(clients, targets, image, version)
            relayed = _time.perf_counter() - t0
            _ok(sent)
            version += 1  # the way before relays: one stream per replica, in parallel
            with ThreadPoolExecutor(r) as pool:
                t0 = _time.perf_counter()
                separate = list(pool.map(lambda a: _push_full(clients, [a], image, version), targets))
                apart = _time.perf_counter() - t0
            for s in separate:
                _ok(s)
            egress_apart = sum(s.sent_bytes for s in separate)
            log.info("[fleet] R=%d: relayed %.2f MB in %.2f s; separate streams %.2f MB in %.2f s", r,
                     sent.sent_bytes / 1e6, relayed, egress_apart / 1e6, apart)
            rows += [
                dict(model=f"tiny x{r}", metric="trainer egress MB per push", value=sent.sent_bytes / 1e6,
                     baseline=sent.payload_bytes / 1e6, baseline_name="the payload",
                     ratio=sent.sent_bytes / sent.payload_bytes, target=1.1),
                dict(model=f"tiny x{r}", metric="s to all replicas (relayed)", value=relayed, baseline=apart,
                     baseline_name=f"{r} separate streams ({egress_apart / 1e6:.1f} MB out)",
                     ratio=relayed / apart, target=None),
            ]
        for c in clients.values():
            c.close()
    finally:
        for s in servers:
            s.terminate()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", action="store_true", help="also the ~344 MB model (86M params, float32), and its deltas")
    p.add_argument("--fleet", action="store_true", help="also egress and time to all for 1, 2 and 4 tiny replicas")
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
            rows += bench_deltas(root)
        if args.fleet:
            rows += bench_fleet(root)
    if args.json:
        print(json.dumps(rows, indent=2), file=out)
        out.flush()
        return 0
    width = max(6, *(len(r["model"]) for r in rows))
    print(f"{'model':{width}} {'metric':44} {'ours':>10} {'baseline':>10} {'ratio':>7} {'target':>7}  baseline is",
          file=out)
    for r in rows:
        target = "" if r["target"] is None else (f">= {r['target']}" if "MB/s" in r["metric"] else f"<= {r['target']}")
        print(f"{r['model']:{width}} {r['metric']:44} {r['value']:10.3f} {r['baseline']:10.3f} {r['ratio']:7.3f} "
              f"{target:>7}  {r['baseline_name']}", file=out)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
