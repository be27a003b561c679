"""Online PPO against live policy and reward services (`rlhf train ppo`).

One step, top to bottom (InstructGPT's recipe, CleanRL's layout):

    collect()          prompts -> Generate on the policy replicas -> Score on the reward service
    make_experience()  logprobs of the policy and the frozen reference, values -> per-token KL
                       penalty + score at the last token -> GAE -> whitened advantages
    ppo_update()       epochs x minibatches: clipped ratio loss, clipped value loss, entropy bonus
    push               the new weights to every policy replica, as version + 1
    step_metrics()     what the step did: the log, Prometheus, TrainerService

Under torchrun every rank runs this loop on its shard of the models (services.trainer.distributed).
Each rank generates and scores its share of the prompts; the samples are then gathered, so every
rank holds the whole batch and computes every batch statistic (advantage whitening, KL, the
token counts that normalise the losses) over all of it. Each global minibatch is split between
the ranks and the loss normalised by the minibatch's global token count, so N ranks make the
same update as one rank on the same batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import pathlib
import signal
import sys
import threading
import time

import numpy as np
import torch
from tqdm import tqdm

from services.common.config import ClientConfig, ServerConfig
from services.common.text import format_prompt
from services.trainer import checkpoint, distributed, metrics
from services.trainer.config import Config, ConfigError, dump
from services.trainer.control import Checkpoint, Control, Phase
from services.trainer.data import read_jsonl
from services.trainer.distributed import Dist
from services.trainer.experience import Batch, Experience, Rollout, Sample, policy_forward, value_forward
from services.trainer.metrics import StepMetrics
from services.trainer.ppo import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae,
                                  masked_mean, masked_whiten, policy_loss, shape_rewards, value_loss)
from services.trainer.rollout import Backoff, DependencyDown, PolicyReplicas, RequestRefused, Scorer, Stopped

log = logging.getLogger(__name__)

# The largest weight version a replica accepts (the contract bounds it to int64).
MAX_VERSION = 2**63 - 1


class Prompts:
    """The train prompts in a seeded order per epoch; the position is checkpointed."""

    def __init__(self, path: str, seed: int):
        rows = read_jsonl(path, ("prompt",))
        self.prompts = [r["prompt"] for r in rows if r.get("split", "train") == "train"]
        if not self.prompts:
            raise ConfigError(f"prompts: {path} holds no train prompts")
        self.seed, self.epoch, self.index = seed, 0, 0

    def next(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.prompts))
            take = order[self.index:self.index + n - len(out)]
            out += [self.prompts[i] for i in take]
            self.index += len(take)
            if self.index >= len(self.prompts):
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


@dataclasses.dataclass
class PPOState:
    """What a checkpoint holds: the trained models and their optimizers and schedulers, the frozen
    reference, the KL controller, the prompt position, the step and the weight version."""
    policy: torch.nn.Module
    reference: torch.nn.Module
    value: torch.nn.Module
    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer
    policy_sched: torch.optim.lr_scheduler.LRScheduler
    value_sched: torch.optim.lr_scheduler.LRScheduler
    kl_ctl: FixedKLController | AdaptiveKLController
    prompts: Prompts
    step: int = 0
    version: int = 0
    history: list[StepMetrics] = dataclasses.field(default_factory=list)

    @classmethod
    def build(cls, config: Config, d: Dist) -> "PPOState":
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cfg = config.ppo
        policy = distributed.load_model(AutoModelForCausalLM, config.sft_model, d)
        reference = distributed.load_model(AutoModelForCausalLM, config.sft_model, d, trainable=False)
        value = distributed.load_model(AutoModelForSequenceClassification, config.reward_model, d, num_labels=1)
        policy_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, eps=1e-5)
        value_opt = torch.optim.AdamW(value.parameters(), lr=cfg.value_lr or 10 * cfg.lr, eps=1e-5)
        warmup = lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1))  # noqa: E731
        kl_ctl = (AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl
                  else FixedKLController(cfg.beta))
        return cls(policy, reference, value, policy_opt, value_opt,
                   torch.optim.lr_scheduler.LambdaLR(policy_opt, warmup),
                   torch.optim.lr_scheduler.LambdaLR(value_opt, warmup), kl_ctl, Prompts(config.prompts, config.seed))

    def trained(self) -> dict:
        return {"policy": (self.policy, self.policy_opt), "value": (self.value, self.value_opt)}

    def scalars(self) -> dict:
        return dict(policy_sched=self.policy_sched.state_dict(), value_sched=self.value_sched.state_dict(),
                    kl_ctl=self.kl_ctl.state_dict(), prompts=self.prompts.state_dict(), weight_version=self.version,
                    history=[m.to_json() for m in self.history])

    def save(self, out: pathlib.Path, tokenizer, d: Dist) -> pathlib.Path:
        return checkpoint.save(out, self.step, d, trained=self.trained(), state=self.scalars(),
                               export=lambda path: distributed.export_hf(self.policy, tokenizer, path, d))

    def load(self, path: pathlib.Path, d: Dist) -> None:
        state = checkpoint.load(path, d, trained=self.trained())
        self.policy_sched.load_state_dict(state["policy_sched"])
        self.value_sched.load_state_dict(state["value_sched"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.prompts.load_state_dict(state["prompts"])
        self.step, self.version = state["step"], state["weight_version"]
        self.history = [StepMetrics(**m) for m in state["history"]]


@contextlib.contextmanager
def phase(seconds: dict[str, float], p: Phase, control: Control):
    """Time one phase of the step and show it in GetStatus."""
    control.set_phase(p)
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[p.value] = seconds.get(p.value, 0.0) + time.perf_counter() - start


# ---- the step ------------------------------------------------------------------------------

def collect(state: PPOState, config: Config, replicas: PolicyReplicas, scorer: Scorer, tokenizer, d: Dist,
            seconds: dict, control: Control, sync) -> Rollout:
    """Sample a completion for each of the step's prompts and score it. Each rank does its share;
    the samples come back gathered, in prompt order, on every rank."""
    prompts = state.prompts.next(config.rollout.batch_size)
    mine = d.rows(len(prompts))
    prompt_ids = [tokenizer(format_prompt(tokenizer, prompts[i]), add_special_tokens=False).input_ids for i in mine]
    sampling = dict(max_tokens=config.rollout.max_tokens, temperature=config.rollout.temperature,
                    top_p=config.rollout.top_p, logprobs=True)

    with phase(seconds, Phase.GENERATING, control):
        results = replicas.generate_all(prompt_ids, sampling, sync)

    # Never train on completions from other weights, and an empty answer has nothing to score:
    # both leave the batch here, counted.
    version = replicas.version
    completions = [r.completions[0] for r in results]
    fresh = [j for j, c in enumerate(completions) if 0 <= version - c.weight_version <= config.services.max_staleness]
    keep = [j for j in fresh if completions[j].text.strip()]

    def score() -> tuple[list[Sample], int, int, int]:
        scored = scorer.score([(prompts[mine[j]], completions[j].text) for j in keep],
                              normalize=config.ppo.normalize_scores) if keep else []
        samples = [Sample(prompts[mine[j]], prompt_ids[j], list(completions[j].token_ids), completions[j].text,
                          list(completions[j].logprobs), completions[j].finish_reason, completions[j].weight_version,
                          r.score) for j, r in zip(keep, scored)]
        return (samples, sum(len(c.token_ids) for c in completions), len(completions) - len(fresh),
                len(fresh) - len(keep))

    with phase(seconds, Phase.SCORING, control):
        parts = distributed.agree(score, d, (DependencyDown, Stopped, RequestRefused))
    samples = distributed.interleave([p[0] for p in parts])
    # Whole minibatches only (each split evenly over the ranks); what is cut is counted too.
    usable = len(samples) - len(samples) % config.ppo.minibatch_size
    return Rollout(samples[:usable], prompts, generated_tokens=sum(p[1] for p in parts),
                   dropped_stale=sum(p[2] for p in parts), dropped_empty=sum(p[3] for p in parts),
                   dropped_trim=len(samples) - usable)


def forward_rows(fn, batch: Batch, rows: list[int], chunk: int) -> torch.Tensor:
    """fn(batch.rows(...)) over `rows` in chunks of `chunk` rows, concatenated ([len(rows), R])."""
    return torch.cat([fn(batch.rows(rows[i:i + chunk])) for i in range(0, len(rows), chunk)])


@torch.no_grad()
def make_experience(state: PPOState, rollout: Rollout, config: Config, pad_id: int, d: Dist) -> Experience:
    """Everything the update needs, computed with the weights of the step's start. Each rank runs
    the forward passes of its rows; the results are gathered, and the rest is computed on the
    whole batch, identically on every rank."""
    cfg, T = config.ppo, config.rollout.temperature
    batch = Batch.of(rollout.samples, pad_id, d.device)
    mine, chunk = d.rows(len(batch)), cfg.minibatch_size // d.world_size
    # Old logprobs are recomputed here, not trusted from the sampler: the update's ratio must
    # compare the trainer's numbers with the trainer's numbers.
    old_logprobs = distributed.gather_rows(forward_rows(lambda b: policy_forward(state.policy, b, T)[0], batch,
                                                        mine, chunk), d)
    ref_logprobs = distributed.gather_rows(forward_rows(lambda b: policy_forward(state.reference, b, T)[0], batch,
                                                        mine, chunk), d)
    values = distributed.gather_rows(forward_rows(lambda b: value_forward(state.value, b), batch, mine, chunk), d)

    mask = batch.response_mask
    sampler_logprobs = torch.zeros_like(old_logprobs)
    for i, s in enumerate(rollout.samples):
        sampler_logprobs[i, :len(s.sampler_logprobs)] = torch.tensor(s.sampler_logprobs)
    scores = torch.tensor([s.score for s in rollout.samples], device=d.device)
    missing_eos = torch.tensor([s.finish_reason == "length" for s in rollout.samples], device=d.device)
    rewards, kl, shaped = shape_rewards(scores, old_logprobs, ref_logprobs, mask, state.kl_ctl.value,
                                        kl_estimator=cfg.kl_estimator, missing_eos=missing_eos,
                                        missing_eos_penalty=cfg.missing_eos_penalty, score_clip=cfg.score_clip)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask)
    return Experience(batch, old_logprobs, ref_logprobs, sampler_logprobs, values, kl, rewards, advantages, returns,
                      shaped)


def ppo_update(state: PPOState, exp: Experience, config: Config, d: Dist) -> dict[str, float]:
    """cfg.epochs passes over the batch in minibatches. Each global minibatch of M rows is split
    into M / world_size rows per rank; the loss is normalised by the minibatch's token count over
    all ranks (FSDP averages gradients over the ranks, hence the factor world_size), so the
    gradient is the same whatever the number of ranks. Returns token-weighted means of the
    losses and statistics over the whole update."""
    cfg, T = config.ppo, config.rollout.temperature
    B, M = len(exp.batch), cfg.minibatch_size
    m = M // d.world_size
    mask = exp.batch.response_mask
    # Seeded by step: the same minibatches on every rank, and after a resume.
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + state.step)
    sums = dict.fromkeys(("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy", "tokens"), 0.0)
    for _ in range(cfg.epochs):
        for minibatch in torch.randperm(B, generator=generator).split(M):
            rows = minibatch[d.rank * m:(d.rank + 1) * m].to(d.device)
            local_mask = mask[rows]
            n_local, n_global = local_mask.sum(), mask[minibatch.to(d.device)].sum()
            scale = d.world_size * n_local / n_global
            local = exp.batch.rows(rows)

            new_logprobs, logits = policy_forward(state.policy, local, T)
            pg_loss, clipfrac, approx_kl = policy_loss(new_logprobs, exp.old_logprobs[rows], exp.advantages[rows],
                                                       local_mask, cfg.clip)
            with torch.set_grad_enabled(cfg.ent_coef > 0):  # the [B, R, vocab] graph only when it is trained
                entropy = masked_mean(entropy_from_logits(logits), local_mask)
            new_values = value_forward(state.value, local)
            vf_loss, _ = value_loss(new_values, exp.values[rows], exp.returns[rows], local_mask, cfg.value_clip)
            loss = scale * (pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * vf_loss)

            state.policy_opt.zero_grad(set_to_none=True)
            state.value_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(state.policy.parameters(), cfg.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(state.value.parameters(), cfg.max_grad_norm)
            state.policy_opt.step()
            state.value_opt.step()
            n = n_local.item()
            for key, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_fraction", clipfrac),
                           ("approx_kl", approx_kl), ("entropy", entropy)):
                sums[key] += v.item() * n
            sums["tokens"] += n
    state.policy_sched.step()
    state.value_sched.step()
    totals = dict(zip(sums, distributed.all_sum(list(sums.values()), d)))
    return {key: totals[key] / totals["tokens"] for key in sums if key != "tokens"}


def step_metrics(state: PPOState, rollout: Rollout, exp: Experience, stats: dict, beta: float, seconds: dict,
                 step_seconds: float, resyncs: int) -> StepMetrics:
    mask = exp.batch.response_mask
    samples = rollout.samples
    return StepMetrics(
        step=state.step, weight_version=state.version - 1, pushed_version=state.version, time=time.time(),
        reward_mean=float(np.mean([s.score for s in samples])), score_mean=exp.scores.mean().item(),
        kl=exp.kl.sum(-1).mean().item(), entropy=stats["entropy"], clip_fraction=stats["clip_fraction"],
        approx_kl=stats["approx_kl"], policy_loss=stats["policy_loss"], value_loss=stats["value_loss"], beta=beta,
        tokens_per_second=rollout.generated_tokens / step_seconds,
        logprob_gap=masked_mean((exp.old_logprobs - exp.sampler_logprobs).abs(), mask).item(),
        completions=len(samples), completions_dropped=rollout.dropped_stale, completions_empty=rollout.dropped_empty,
        completions_trimmed=rollout.dropped_trim, generated_tokens=rollout.generated_tokens,
        missing_eos_share=float(np.mean([s.finish_reason == "length" for s in samples])),
        response_length=mask.sum(-1).mean().item(), replica_resyncs=resyncs,
        trained_versions=sorted({s.weight_version for s in samples}),
        prompts_sha=hashlib.sha256("\n".join(rollout.prompts).encode()).hexdigest()[:16],
        phase_seconds=dict(seconds))


# ---- between steps -------------------------------------------------------------------------

def between_steps(control: Control, d: Dist, stop: threading.Event, save, replicas: PolicyReplicas) -> bool:
    """Checkpoints asked for over TrainerService, a pause, a stop: decided on rank 0 (a stop on
    any rank), done by every rank together. False: stop the run."""
    last_probe = time.monotonic()
    while True:
        flags = [stop.is_set(), d.main and control.paused, d.main and control.checkpoint_requested()]
        stop_now, paused, checkpoint_asked = distributed.all_max(flags, d)
        if checkpoint_asked:
            save()
        if stop_now:
            return False
        if not paused:
            return True
        if d.main:  # the other ranks wait for rank 0 in the next all_max
            control.set_phase(Phase.PAUSED)
            control.wait_for_resume(0.2)
            if time.monotonic() - last_probe > 2.0:  # keep GetStatus's replica list true while paused
                replicas.refresh()
                last_probe = time.monotonic()


# ---- the run -------------------------------------------------------------------------------

def train(config: Config, client_config: ClientConfig, server_config: ServerConfig | None = None,
          resume: bool = False, handle_signals: bool = True) -> list[StepMetrics]:
    """Run config.steps PPO steps; returns the per-step metrics. With handle_signals, SIGTERM and
    SIGINT finish the current step and checkpoint instead of killing the run."""
    from transformers import AutoTokenizer

    d = distributed.init(config.device, config.dtype, config.collective_timeout_s)
    for key, value in (("rollout.batch_size", config.rollout.batch_size),
                       ("ppo.minibatch_size", config.ppo.minibatch_size)):
        if value % d.world_size:
            raise ConfigError(f"{key} ({value}) must be a multiple of the number of ranks ({d.world_size})")
    torch.manual_seed(config.seed)
    out = pathlib.Path(config.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    tokenizer = AutoTokenizer.from_pretrained(config.sft_model)
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id == tokenizer.pad_token_id:
        raise ConfigError(f"sft_model: the tokenizer of {config.sft_model} needs an EOS token distinct from PAD")

    state = PPOState.build(config, d)
    log.info("rank %d/%d on %s, compute %s: %.1f MB of policy + value parameters here", d.rank, d.world_size,
             d.device, str(d.dtype).removeprefix("torch."), distributed.local_bytes(state.policy, state.value) / 1e6)

    control = Control(config.steps)
    stop = threading.Event()
    services = config.services
    backoff = Backoff(services.retry_initial_s, services.retry_max_s, services.dependency_deadline_s, stop)
    replicas = PolicyReplicas(config.policy_addresses, client_config, backoff, services.rpc_timeout_s, d,
                              on_change=control.set_replicas)
    scorer = Scorer(config.reward_address, client_config, backoff, services.rpc_timeout_s)
    server = None
    if server_config is not None and d.main:
        from services.common.server import BackgroundServer
        from services.trainer.server import TrainerServicer
        server = BackgroundServer(server_config, TrainerServicer(control)).start()

    shapes = distributed.parameter_shapes(state.policy)
    parameters = lambda: distributed.full_parameters(state.policy, d)  # noqa: E731
    on_wait = lambda message: control.set_phase(Phase.WAITING, message)  # noqa: E731

    def sync(waits=None) -> None:
        replicas.sync(parameters, shapes, waits, on_wait)

    def save() -> pathlib.Path:
        control.set_phase(Phase.CHECKPOINTING)
        path = state.save(out, tokenizer, d)
        if d.main:
            control.checkpoint_done(Checkpoint(path, state.step))
        return path

    # SIGTERM (Kubernetes eviction, torchrun stopping the job): finish the step, checkpoint, exit.
    def on_signal(*_):
        stop.set()
        control.resume()  # a paused run must wake up to stop

    previous_handlers = ({s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
                         if handle_signals else {})
    try:
        resumed = distributed.broadcast_object(checkpoint.latest(out) if resume and d.main else None, d)
        if resumed is not None:
            state.load(resumed, d)
            control.history = list(state.history)
            log.info("resumed from %s at step %d (weight version %d)", resumed, state.step, state.version)
        if d.main:
            info = scorer.model_info()
            log.info("reward service: %s (%s)", info.model_name, ", ".join(
                f"{c.name} x {c.weight:g}" for c in info.components) or "reward model")

        # Every replica to the trainer's weights first, on a fresh start and a resume alike.
        # Versions only go up, so the trainer's continues above anything a replica serves.
        control.set_phase(Phase.SYNCING)
        if d.main:
            replicas.refresh()
        version = distributed.broadcast_object(max(state.version, replicas.max_version()) + 1, d)
        if version > MAX_VERSION:
            raise ConfigError(f"a policy replica serves weight version {version - 1}, the highest there is: "
                              f"restart it (a restarted replica serves version 0)")
        state.version = replicas.version = version
        sync()

        progress = tqdm(total=config.steps, initial=state.step, desc="PPO", unit="step", dynamic_ncols=True,
                        disable=not d.main)
        resyncs = replicas.resyncs
        while state.step < config.steps and between_steps(control, d, stop, save, replicas):
            seconds, step_start = {}, time.perf_counter()
            with phase(seconds, Phase.SYNCING, control):
                sync()
            rollout = collect(state, config, replicas, scorer, tokenizer, d, seconds, control, sync)
            if not rollout.samples:
                log.warning("step %d: no usable completion (%d stale, %d empty), sampling again", state.step,
                            rollout.dropped_stale, rollout.dropped_empty)
                continue
            with phase(seconds, Phase.REFERENCE, control):
                exp = make_experience(state, rollout, config, tokenizer.pad_token_id, d)
            with phase(seconds, Phase.TRAINING, control):
                stats = ppo_update(state, exp, config, d)
            beta = state.kl_ctl.value
            state.kl_ctl.update(exp.kl.sum(-1).mean().item(), len(rollout.samples))
            with phase(seconds, Phase.PUSHING, control):
                state.version = replicas.version = state.version + 1
                replicas.push_all(parameters, shapes)
            state.step += 1

            m = step_metrics(state, rollout, exp, stats, beta, seconds, time.perf_counter() - step_start,
                             replicas.resyncs)
            state.history.append(m)
            if d.main:
                control.record(m)
                metrics.export(m, sum(r.in_sync for r in control.replicas), replicas.resyncs - resyncs)
                resyncs = replicas.resyncs
                metrics.append_jsonl(out / "metrics.jsonl", m)
                progress.update(1)
                progress.set_postfix(reward=f"{m.reward_mean:.3f}", kl=f"{m.kl:.3f}", beta=f"{beta:.3f}")
                log.info("step %d/%d reward %.3f kl %.3f entropy %.3f clip %.3f tok/s %.0f %s", m.step, config.steps,
                         m.reward_mean, m.kl, m.entropy, m.clip_fraction, m.tokens_per_second,
                         " ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))
            if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                save()
        progress.close()
        save()
        done = state.step >= config.steps
        ranks = distributed.all_gather_object(distributed.memory_report(
            d, state.policy, state.value, state.policy_opt, state.value_opt))
        if d.main:
            (out / "ranks.json").write_text(json.dumps(ranks, indent=2))
        if d.main and state.history:
            metrics.plot(state.history, out)
        control.finish(Phase.FINISHED if done else Phase.FAILED, "" if done else "stopped by signal")
        return state.history
    except Stopped:
        log.warning("stopped at step %d; checkpointing", state.step)
        save()
        control.finish(Phase.FAILED, "stopped by signal")
        return state.history
    except (DependencyDown, RequestRefused) as e:
        log.error("stopping: %s; checkpoint at step %d in %s", e, state.step, out)
        save()
        control.finish(Phase.FAILED, str(e))
        raise SystemExit(f"PPO stopped at step {state.step}: {e}. Resume with --resume once it is fixed.") from e
    finally:
        for s, h in previous_handlers.items():
            signal.signal(s, h)
        replicas.close()
        scorer.close()
        if server:
            server.stop()


def main(args) -> int:
    from services.common.malloc import reuse_large_buffers
    from services.trainer.config import from_args

    try:
        config = from_args(Config, args, FLAGS)
    except ConfigError as e:
        print(f"rlhf train ppo: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump(config), end="")
        return 0
    reuse_large_buffers()  # every step pushes the weights as a stream of 1 MiB buffers
    try:
        history = train(config, ClientConfig.from_args(args), ServerConfig.from_args(args), resume=args.resume)
    except ConfigError as e:
        print(f"rlhf train ppo: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.close()
    if not history or history[-1].step < config.steps:
        return 128 + signal.SIGTERM  # stopped early (eviction, drain): not a success, resume later
    return 0


# config key -> the attribute of the parsed CLI arguments that sets it
FLAGS = {"policy_addresses": "policy_addresses", "reward_address": "reward_address", "sft_model": "sft_model",
         "reward_model": "reward_model", "prompts": "prompts", "out": "out", "steps": "steps", "device": "device",
         "dtype": "dtype"}
