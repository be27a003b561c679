"""`bench/ppo.py --compare REF`: this tree's PPO step against another commit's, side by side.

    python bench/ppo.py --compare 7a05011                 # 3 pairs, 6 measured steps per run
    python bench/ppo.py --compare 7a05011 --pairs 5 --steps 8

REF is checked out to a temporary git worktree. Each side runs its own real processes, started
from its own tree: a policy and a reward server (started once, serving all of that side's runs)
and, per run, a fresh `rlhf train ppo` (the same YAML, keys both trees know), on the same models
and prompts, built once by this tree. Runs alternate in pairs, ABBA (this, REF, REF, this, ...),
so a load that drifts over the run weighs on both sides alike; the idle servers of the other side
are there for both.

What a run reports, per measured step (after one warm-up step):
- wall seconds per phase (the trainer's own timing) and of the whole step;
- CPU seconds of the trainer, the policy server (vLLM's engine process included) and the
  reward server, read from /proc: CPU time counts what the processes did, not how long they
  waited for cores that other work held, so it moves far less than wall time on a busy machine;
- voluntary and involuntary context switches of each (every thread counted). A voluntary
  switch is a thread going to sleep; OpenMP workers that sleep between parallel regions instead
  of spinning show up here by the thousand.

Each quantity's value in a run is the median over its steps; the ratio (this / REF) is taken per
pair, and the table shows the median ratio with its spread (min-max over the pairs). A ratio
above 1 is this tree slower or costlier. The last run of each side also lists its trainer's
threads (name, context switches, CPU), which shows a second OpenMP pool when one appears.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import yaml

PHASES = ("generate", "score", "reference", "train", "push")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- reading /proc ---------------------------------------------------------------------------

def _tree(pid: int) -> list[int]:
    import psutil
    try:
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _task_stats(pid: int) -> list[tuple[str, int, int, float, int]]:
    """(name, voluntary, involuntary switches, CPU seconds, thread id) of each thread of a process."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        out.append((fields["Name"], int(fields["voluntary_ctxt_switches"]),
                    int(fields["nonvoluntary_ctxt_switches"]), (int(stat[11]) + int(stat[12])) / CLK_TCK, int(tid)))
    return out


def _process_cpu(pid: int) -> float:
    """CPU seconds of a whole process, its ended threads included."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / CLK_TCK


def snapshot(pids: dict[str, int]) -> dict[str, dict]:
    """Per named process tree: CPU seconds, voluntary and involuntary context switches, and
    (voluntary switches, CPU seconds) of each thread of its first process."""
    out = {}
    for name, pid in pids.items():
        cpu = vol = invol = 0.0
        threads = {}
        for p in _tree(pid):
            cpu += _process_cpu(p)
            for _, v, i, c, tid in _task_stats(p):
                vol, invol = vol + v, invol + i
                if p == pid:
                    threads[tid] = (v, c)
        out[name] = {"cpu": cpu, "voluntary": vol, "involuntary": invol, "threads": threads}
    return out


def compute_threads_voluntary(before: dict, after: dict, share: float = 0.05) -> int:
    """Voluntary switches of the threads that did the work (each >= `share` of the process's CPU
    between the snapshots): the main thread and its OpenMP workers. An OpenMP worker that sleeps
    between parallel regions instead of spinning counts one here per region; helper threads that
    wake on a timer (gloo's TCP loop, gRPC's pollers) do not count."""
    total = after["cpu"] - before["cpu"]
    busy = [tid for tid, (_, c) in after["threads"].items()
            if c - before["threads"].get(tid, (0, 0.0))[1] >= share * max(total, 1e-9)]
    return sum(after["threads"][t][0] - before["threads"].get(t, (0, 0.0))[0] for t in busy)


# ---- one side's run ----------------------------------------------------------------------------

class Side:
    """A source tree whose servers and trainer are run: `python -m services.cli` with its root
    on PYTHONPATH, so that tree's `services` package is the one imported."""

    def __init__(self, name: str, root: pathlib.Path, threads: int | None = None):
        self.name, self.root = name, root
        self.extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}

    def env(self, extra: dict | None = None) -> dict:
        return {**os.environ, "PYTHONPATH": str(self.root), **self.extra, **(extra or {})}

    def command(self, *args: str) -> list[str]:
        # -P: the working directory is not put first on sys.path (it would shadow PYTHONPATH's tree).
        return [sys.executable, "-P", "-m", "services.cli", *args]


def start_servers(side: Side, models: pathlib.Path, logs: pathlib.Path) -> dict:
    """The side's policy and reward servers, serving (vLLM's start takes minutes on a busy machine)."""
    from services.demo.launch import ChildServer, free_port

    logs.mkdir(parents=True, exist_ok=True)
    servers = {}
    for kind in ("policy", "reward"):
        port, metrics = free_port(), free_port()
        extra = ["--kv-cache-gib", "1"] if kind == "policy" else []
        argv = side.command("serve", kind, "--model", str(models / ("sft" if kind == "policy" else "reward")),
                            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics), *extra)
        servers[kind] = ChildServer(argv, port=port, service=f"rlhf.v1.{kind.capitalize()}Service",
                                    log_path=logs / f"{kind}.log", env=side.env({"VLLM_CPU_KVCACHE_SPACE": "1"}),
                                    ready_timeout=1200)
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_ready()
    except BaseException:
        for s in servers.values():
            s.kill()
        raise
    return servers


def run_side(side: Side, servers: dict, config: dict, work: pathlib.Path, tag: str, steps: int) -> dict:
    """The side's trainer for 1 + steps steps against its servers. Returns, per measured step, the
    trainer's phase seconds and the CPU and context switches of each process; and the trainer's
    threads at its last step."""
    from services.demo.launch import free_port

    run_dir = work / tag
    run_dir.mkdir(parents=True)
    config = {**config, "policy_addresses": [servers["policy"].address],
              "reward_address": servers["reward"].address, "out": str(run_dir / "out"), "steps": 1 + steps}
    path = run_dir / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = side.command("train", "ppo", "--config", str(path), "--port", str(free_port()),
                        "--metrics-port", str(free_port()))
    metrics = run_dir / "out" / "metrics.jsonl"
    with open(run_dir / "trainer.log", "wb") as log:
        trainer = subprocess.Popen(argv, env=side.env(), cwd=side.root, stdout=log, stderr=subprocess.STDOUT)
        pids = {"trainer": trainer.pid, "policy": servers["policy"].pid, "reward": servers["reward"].pid}
        snaps, threads = _watch(trainer, metrics, pids, 1 + steps)
        if trainer.wait() != 0:
            raise SystemExit(f"{side.name}: the trainer failed ({trainer.returncode}); see {run_dir / 'trainer.log'}")
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    per_step = []
    for h, (before, after) in zip(history[1:], zip(snaps, snaps[1:])):
        row = {p: h["phase_seconds"].get(p, 0.0) for p in PHASES}
        row["step"] = after["time"] - before["time"]
        for proc in pids:
            for key in ("cpu", "voluntary", "involuntary"):
                row[f"{proc} {key}"] = after[proc][key] - before[proc][key]
        row["trainer voluntary, compute threads"] = compute_threads_voluntary(before["trainer"], after["trainer"])
        per_step.append(row)
    return {"steps": per_step, "threads": threads}


def _watch(trainer: subprocess.Popen, metrics: pathlib.Path, pids: dict, lines: int):
    """Snapshot the processes each time the trainer ends a step (a line in metrics.jsonl), from
    the warm-up step's end on; the trainer's threads at the last step's end."""
    snaps, seen, threads = [], 0, []
    while trainer.poll() is None and seen < lines:
        try:
            with open(metrics, "rb") as f:
                count = f.read().count(b"\n")
        except FileNotFoundError:
            count = 0
        if count > seen:
            seen = count
            snaps.append({"time": time.perf_counter(), **snapshot(pids)})
            if seen >= lines:
                threads = _task_stats(pids["trainer"])
        time.sleep(0.005)
    return snaps[-lines:] if len(snaps) >= lines else snaps, threads


# ---- the comparison ----------------------------------------------------------------------------

def worktree(ref: str, root: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    """REF checked out (detached) to a temporary worktree of the repository at root."""
    path = work / f"ref-{ref.replace('/', '_')}"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "--force", str(path), ref], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def remove_worktree(root: pathlib.Path, path: pathlib.Path) -> None:
    subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(path)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def median_steps(run: dict) -> dict[str, float]:
    keys = run["steps"][0].keys()
    return {k: statistics.median(s[k] for s in run["steps"]) for k in keys}


def compare(args, work: pathlib.Path, models: pathlib.Path, prompts: pathlib.Path) -> dict:
    """Alternating runs of this tree and args.compare; per-pair ratios of every quantity."""
    root = pathlib.Path(__file__).resolve().parents[1]
    ref_root = worktree(args.compare, root, work)
    sides = {"this": Side("this", root, args.threads), "ref": Side(args.compare, ref_root, args.threads)}
    # Keys both trees' configs know (the trainer at 7a05011 had none of today's newer sections).
    config = dict(sft_model=str(models / "sft"), reward_model=str(models / "reward"), prompts=str(prompts), seed=0,
                  checkpoint_every=0,
                  rollout=dict(batch_size=args.batch, max_tokens=args.max_tokens, temperature=1.0),
                  ppo=dict(epochs=1, minibatch_size=args.batch, lr=3e-5, value_lr=1e-4, beta=0.05, vf_coef=0.5,
                           missing_eos_penalty=1.0, normalize_scores=True, score_clip=5.0))
    runs: dict[str, list[dict]] = {"this": [], "ref": []}
    servers: dict[str, dict] = {}
    try:
        for name, side in sides.items():
            print(f"starting the servers of {side.name} ...", file=sys.stderr, flush=True)
            servers[name] = start_servers(side, models, work / f"servers-{name}")
        for pair in range(args.pairs):
            order = ("this", "ref") if pair % 2 == 0 else ("ref", "this")
            for name in order:
                print(f"pair {pair + 1}/{args.pairs}: {sides[name].name} ...", file=sys.stderr, flush=True)
                run = run_side(sides[name], servers[name], config, work, f"{name}-{pair}", args.steps)
                runs[name].append(run)
                m = median_steps(run)
                print(f"  step {m['step']:.3f} s, trainer CPU {m['trainer cpu']:.3f} s, voluntary switches of the "
                      f"trainer's compute threads {m['trainer voluntary, compute threads']:.0f} per step",
                      file=sys.stderr, flush=True)
    finally:
        for group in servers.values():
            for s in group.values():
                s.terminate()
        remove_worktree(root, ref_root)
    medians = {name: [median_steps(r) for r in rs] for name, rs in runs.items()}
    keys = list(medians["this"][0])
    table = {}
    for key in keys:
        ratios = [t[key] / r[key] if r[key] else float("nan") for t, r in zip(medians["this"], medians["ref"])]
        table[key] = {"this": statistics.median(m[key] for m in medians["this"]),
                      "ref": statistics.median(m[key] for m in medians["ref"]),
                      "ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return {"ref": args.compare, "pairs": args.pairs, "steps": args.steps, "table": table,
            "threads": {name: rs[-1]["threads"] for name, rs in runs.items()}}


def print_compare(result: dict, args) -> None:
    threads = f", OMP_NUM_THREADS={args.threads} everywhere" if args.threads else ""
    print(f"PPO step: this tree against {result['ref']}, {args.batch} completions x {args.max_tokens} tokens, one "
          f"epoch, one minibatch, hidden {args.hidden_size} x {args.num_layers} layers{threads}; {result['pairs']} "
          f"alternating pairs of runs, {result['steps']} measured steps each (median per run)\n")
    print(f"{'per step':32s} {'this':>10s} {result['ref']:>10s} {'ratio':>8s} {'spread over pairs':>20s}")
    for key, row in result["table"].items():
        unit = " (s)" if key in PHASES or key == "step" or key.endswith("cpu") else ""
        print(f"{key + unit:32s} {row['this']:10.3f} {row['ref']:10.3f} {row['ratio']:8.3f} "
              f"{row['min']:9.3f} - {row['max']:.3f}")
    for name, threads in result["threads"].items():
        print(f"\nthreads of the trainer ({'this tree' if name == 'this' else result['ref']}) at its last step: "
              "name, voluntary / involuntary switches, CPU s (whole run)")
        for comm, vol, invol, cpu, _ in sorted(threads, key=lambda t: -t[3]):
            print(f"  {comm:24s} {vol:8d} {invol:8d} {cpu:8.2f}")
