"""Online PPO against live policy and reward services (`rlhf train ppo`).

One step, top to bottom (InstructGPT's recipe, CleanRL's layout):

    launch_rollout()   draw the step's prompts; Generate (rollout.n each) on the policy replicas,
                       Score on the reward service (services.trainer.collect)
    finish_rollout()   wait for it, gather every rank's share
    make_experience()  logprobs of the policy and the frozen reference, values -> per-token KL
                       penalty + score at the last token -> advantages (GAE, or critic-free:
                       GRPO, RLOO, REINFORCE++) -> truncated importance weights
    ppo_update()       epochs x minibatches: clipped ratio loss, clipped value loss, KL and entropy terms
    push               the new weights to every policy replica, as version + 1
    step_metrics()     what the step did: the log, Prometheus, TrainerService

rollout.mode one_step_off launches the next step's rollout before this one trains, in a
background thread (gRPC calls only, no collective): generation hides behind training, and the
completions are one weight version old, which the importance weights correct.

Under torchrun every rank runs this loop on its shard of the models (services.trainer.distributed).
Each rank generates and scores its share of the prompts; the samples are then gathered, so every
rank holds the whole batch and computes every batch statistic (advantage whitening, KL, the
token counts that normalise the losses) over all of it. Each global minibatch is split between
the ranks and the loss normalised by the minibatch's global token count, so N ranks make the
same update as one rank on the same batch.
"""
from __future__ import annotations

import collections
import concurrent.futures
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
from services.trainer import checkpoint, distributed, formats, lora, metrics
from services.trainer.collect import PendingRollout, abandon, finish_rollout, launch_rollout
from services.trainer.config import Config, ConfigError, check_fleet, dump
from services.trainer.control import Checkpoint, Control, Phase, phase
from services.trainer.distributed import Dist
from services.trainer.experience import Batch, Experience, Rollout, policy_forward, value_forward
from services.trainer.metrics import StepMetrics
from services.trainer.ppo import (KL_ESTIMATORS, aggregate, gae, grpo_advantages,
                                  loss_normalizer, masked_mean, masked_whiten, per_token, policy_loss,
                                  reinforce_pp_advantages, rloo_advantages, shape_rewards, truncated_is_weights,
                                  value_loss)
from services.trainer.canary import Canary, CanaryFailed
from services.trainer.rollout import (Backoff, DependencyDown, PolicyReplicas, PushConfig, RequestRefused, Scorer,
                                      Stopped)
from services.trainer.state import PPOState, Prompts

log = logging.getLogger(__name__)

# The largest weight version a replica accepts (the contract bounds it to int64).
MAX_VERSION = 2**63 - 1


# ---- the step ------------------------------------------------------------------------------

def forward_rows(fn, batch: Batch, rows: list[int], chunk: int) -> torch.Tensor:
    """fn(batch.rows(...)) over `rows` in chunks of `chunk` rows, concatenated ([len(rows), R])."""
    return torch.cat([fn(batch.rows(rows[i:i + chunk])) for i in range(0, len(rows), chunk)])


@torch.no_grad()
def make_experience(state: PPOState, rollout: Rollout, config: Config, pad_id: int, d: Dist) -> Experience:
    """Everything the update needs, computed with the weights of the step's start. Each rank runs
    the forward passes of its rows; the results are gathered, and the rest is computed on the
    whole batch, identically on every rank."""
    with distributed.autocast(d):
        return _make_experience(state, rollout, config, pad_id, d)


def _make_experience(state: PPOState, rollout: Rollout, config: Config, pad_id: int, d: Dist) -> Experience:
    cfg, T = config.ppo, config.rollout.temperature
    batch = Batch.of(rollout.samples, pad_id, d.device)
    mine, chunk = d.rows(len(batch)), cfg.minibatch_size // d.world_size
    # Old logprobs are recomputed here, not trusted from the sampler: the update's ratio must
    # compare the trainer's numbers with the trainer's numbers.
    old_logprobs = distributed.gather_rows(forward_rows(lambda b: policy_forward(state.policy, b, T)[0], batch,
                                                        mine, chunk), d)
    with state.reference_model() as reference:  # with LoRA: the policy, its adapter off
        ref_logprobs = distributed.gather_rows(forward_rows(lambda b: policy_forward(reference, b, T)[0], batch,
                                                            mine, chunk), d)
    mask = batch.response_mask
    values = (distributed.gather_rows(forward_rows(lambda b: value_forward(state.value, b), batch, mine, chunk), d)
              if state.value is not None else torch.zeros_like(old_logprobs))

    sampler_logprobs = torch.zeros_like(old_logprobs)
    for i, s in enumerate(rollout.samples):
        sampler_logprobs[i, :len(s.sampler_logprobs)] = torch.tensor(s.sampler_logprobs)
    scores = torch.tensor([s.score for s in rollout.samples], device=d.device)
    missing_eos = torch.tensor([s.finish_reason == "length" for s in rollout.samples], device=d.device)
    # The KL to the reference either shapes the reward here (a penalty on every token) or is a
    # term of the loss (ppo_update); it is measured either way.
    beta = state.kl_ctl.value if cfg.kl_in == "reward" else 0.0
    rewards, kl, shaped = shape_rewards(scores, old_logprobs, ref_logprobs, mask, beta,
                                        kl_estimator=cfg.kl_estimator, missing_eos=missing_eos,
                                        missing_eos_penalty=cfg.missing_eos_penalty, score_clip=cfg.score_clip)
    if config.is_correction:
        is_weights, is_capped = truncated_is_weights(old_logprobs, sampler_logprobs, mask, cfg.is_cap)
    else:
        is_weights, is_capped = mask, torch.zeros_like(mask, dtype=torch.bool)
    returns = torch.zeros_like(rewards)
    if cfg.advantage == "gae":
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
    elif cfg.advantage == "reinforce_pp":
        advantages = reinforce_pp_advantages(rewards, mask, cfg.gamma)
    else:  # a sequence-level estimator: the sequence's reward is its score (minus its KL penalty)
        sequence_rewards = rewards.sum(-1)
        estimate = (grpo_advantages(sequence_rewards, rollout.group_sizes, cfg.scale_rewards)
                    if cfg.advantage == "grpo" else rloo_advantages(sequence_rewards, rollout.group_sizes))
        advantages = per_token(estimate, mask)
    return Experience(batch, old_logprobs, ref_logprobs, sampler_logprobs, values, kl, rewards, advantages, returns,
                      shaped, is_weights, is_capped)


def ppo_update(state: PPOState, exp: Experience, config: Config, d: Dist) -> dict[str, float]:
    """cfg.epochs passes over the batch in minibatches. Each global minibatch of M rows is split
    into M / world_size rows per rank; every loss term is normalised by the minibatch's token
    (or sequence) count over all ranks, and FSDP averages gradients over the ranks (hence the
    factor world_size), so the gradient is the same whatever the number of ranks. Returns the
    mean per minibatch of the losses, and token means of the statistics, over the whole update."""
    cfg, T = config.ppo, config.rollout.temperature
    B, M = len(exp.batch), cfg.minibatch_size
    m, W = M // d.world_size, d.world_size
    mask = exp.batch.response_mask
    optimizers = [opt for _, opt in state.trained().values()]
    # Seeded by step: the same minibatches on every rank, and after a resume.
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + state.step)
    losses = dict.fromkeys(("policy_loss", "value_loss", "kl_loss", "minibatches"), 0.0)
    token_stats = dict.fromkeys(("clip_fraction", "approx_kl", "entropy", "tokens"), 0.0)
    for _ in range(cfg.epochs):
        for minibatch in torch.randperm(B, generator=generator).split(M):
            minibatch = minibatch.to(d.device)
            rows = minibatch[d.rank * m:(d.rank + 1) * m]
            local, local_mask = exp.batch.rows(rows), mask[rows]
            normalizer = loss_normalizer(mask[minibatch], cfg.loss_agg)  # over every rank's rows
            tokens = mask[minibatch].sum()

            with distributed.autocast(d):
                new_logprobs, entropy = policy_forward(state.policy, local, T, entropy=True,
                                                       entropy_grad=cfg.ent_coef > 0)
            pg_loss, clipfrac, approx_kl = policy_loss(new_logprobs, exp.old_logprobs[rows], exp.advantages[rows],
                                                       local_mask, cfg.clip, loss_agg=cfg.loss_agg,
                                                       normalizer=normalizer,
                                                       is_weights=exp.is_weights[rows] if config.is_correction else None)
            loss = pg_loss
            if cfg.ent_coef > 0:
                loss = loss - cfg.ent_coef * aggregate(entropy, local_mask, cfg.loss_agg, normalizer)
            kl_loss = torch.zeros(())
            if cfg.kl_in == "loss":
                kl = KL_ESTIMATORS[cfg.kl_estimator](new_logprobs, exp.ref_logprobs[rows])
                kl_loss = aggregate(kl, local_mask, cfg.loss_agg, normalizer)
                loss = loss + state.kl_ctl.value * kl_loss
            vf_loss = torch.zeros(())
            if state.value is not None:
                with distributed.autocast(d):
                    new_values = value_forward(state.value, local)
                vf_loss, _ = value_loss(new_values, exp.values[rows], exp.returns[rows], local_mask, cfg.value_clip,
                                        normalizer=tokens)
                loss = loss + cfg.vf_coef * vf_loss

            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            (W * loss).backward()
            for model, opt in state.trained().values():
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
            # Each rank's share of this minibatch's losses: summed over the ranks below.
            losses["policy_loss"] += pg_loss.item()
            losses["value_loss"] += vf_loss.item()
            losses["kl_loss"] += kl_loss.item()
            losses["minibatches"] += 1 / W
            n = local_mask.sum().item()
            token_stats["clip_fraction"] += clipfrac.item() * n
            token_stats["approx_kl"] += approx_kl.item() * n
            token_stats["entropy"] += masked_mean(entropy, local_mask).item() * n
            token_stats["tokens"] += n
    for sched in state.schedulers().values():
        sched.step()
    totals = dict(zip([*losses, *token_stats], distributed.all_sum([*losses.values(), *token_stats.values()], d)))
    return {**{k: totals[k] / totals["minibatches"] for k in losses if k != "minibatches"},
            **{k: totals[k] / totals["tokens"] for k in token_stats if k != "tokens"}}


def step_metrics(state: PPOState, rollout: Rollout, exp: Experience, stats: dict, beta: float, seconds: dict,
                 step_seconds: float, resyncs: int) -> StepMetrics:
    mask = exp.batch.response_mask
    samples = rollout.samples
    return StepMetrics(
        step=state.step, weight_version=min(s.weight_version for s in samples), pushed_version=state.version,
        time=time.time(),
        reward_mean=float(np.mean([s.score for s in samples])), score_mean=exp.scores.mean().item(),
        reward_components={name: float(np.mean([s.components[name] for s in samples]))
                           for name in samples[0].components},
        reward_version=rollout.reward_version, reward_versions=dict(rollout.reward_versions),
        completions_rescored=rollout.rescored_reward_version,
        completions_dropped_reward_version=rollout.dropped_reward_version,
        kl=exp.kl.sum(-1).mean().item(), entropy=stats["entropy"], clip_fraction=stats["clip_fraction"],
        approx_kl=stats["approx_kl"], policy_loss=stats["policy_loss"], value_loss=stats["value_loss"],
        kl_loss=stats["kl_loss"], beta=beta,
        tokens_per_second=rollout.generated_tokens / step_seconds,
        logprob_gap=masked_mean((exp.old_logprobs - exp.sampler_logprobs).abs(), mask).item(),
        completions=len(samples), completions_dropped=rollout.dropped_stale, completions_empty=rollout.dropped_empty,
        completions_trimmed=rollout.dropped_trim, generated_tokens=rollout.generated_tokens,
        missing_eos_share=float(np.mean([s.finish_reason == "length" for s in samples])),
        response_length=mask.sum(-1).mean().item(), replica_resyncs=resyncs,
        trained_versions=sorted({s.weight_version for s in samples}),
        staleness={str(k): v for k, v in sorted(collections.Counter(state.version - 1 - s.weight_version
                                                                     for s in samples).items())},
        is_weight_mean=masked_mean(exp.is_weights, mask).item(),
        is_weight_max=float(exp.is_weights.max()), is_capped_share=masked_mean(exp.is_capped.float(), mask).item(),
        rollout_seconds=rollout.rollout_seconds,
        rollout_hidden=(max(0.0, 1.0 - rollout.waited_seconds / rollout.rollout_seconds)
                        if rollout.waited_seconds < rollout.rollout_seconds else 0.0),
        prompts_sha=hashlib.sha256("\n".join(map(formats.as_prompt_text, rollout.prompts)).encode()).hexdigest()[:16],
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

def longest_prompt(tokenizer, prompts: Prompts) -> tuple[int, int]:
    """(tokens, index) of the longest prompt as the policy will read it."""
    lengths = [len(tokenizer(formats.render_prompt(tokenizer, p, f"prompt {i}"), add_special_tokens=False).input_ids)
               for i, p in enumerate(prompts.prompts)]
    index = max(range(len(lengths)), key=lengths.__getitem__)
    return lengths[index], index


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
    log.info("rank %d/%d on %s, compute %s, %s%s: %.1f MB of models here, %.1f MB of them trained", d.rank,
             d.world_size, d.device, str(d.dtype).removeprefix("torch."), config.ppo.advantage,
             f", LoRA rank {config.lora.rank}" if config.lora.enabled else "",
             distributed.local_bytes(*state.models()) / 1e6, distributed.local_bytes(*state.trained_parameters()) / 1e6)

    control = Control(config.steps)
    stop = threading.Event()
    services = config.services
    backoff = Backoff(services.retry_initial_s, services.retry_max_s, services.dependency_deadline_s, stop,
                      on_failing=control.dependency_failing, on_recovered=control.dependency_ok)
    replicas = PolicyReplicas(config.policy_addresses, client_config, backoff, services.rpc_timeout_s, d,
                              on_change=control.set_replicas,
                              push=PushConfig(services.push, services.push_commit, services.push_fanout))
    scorer = Scorer(config.reward_address, client_config, backoff, services.rpc_timeout_s)
    server = None
    if server_config is not None and d.main:
        from services.common.server import BackgroundServer
        from services.trainer.server import TrainerServicer
        server = BackgroundServer(server_config, TrainerServicer(control)).start()

    on_wait = lambda message: control.dependency_failing("policy replicas", message)  # noqa: E731

    def sync(waits=None) -> None:
        replicas.sync(waits, on_wait)
        control.dependency_ok("policy replicas")

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
    background = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout")
                  if config.rollout.mode == "one_step_off" else None)
    pending: PendingRollout | None = None
    try:
        resumed = distributed.broadcast_object(checkpoint.latest(out) if resume and d.main else None, d)
        if resumed is not None:
            state.load(resumed, d)
            control.history = list(state.history)
            log.info("resumed from %s at step %d (weight version %d)", resumed, state.step, state.version)
        # Every replica to the trainer's weights first, on a fresh start and a resume alike.
        # Versions only go up, so the trainer's continues above anything a replica serves.
        control.set_phase(Phase.SYNCING)
        problem = None
        if d.main:
            reward_info = scorer.model_info()
            log.info("reward service: %s (%s)", reward_info.model_name, ", ".join(
                f"{c.name} x {c.weight:g}" for c in reward_info.components) or "reward model")
            replicas.refresh()
            policy_infos = {r.address: r.client.model_info(timeout=services.rpc_timeout_s)
                            for r in replicas.replicas.values() if r.available}
            try:
                check_fleet(config, d.world_size, policy_infos, reward_info, longest_prompt(tokenizer, state.prompts))
            except ConfigError as e:
                problem = str(e)
        problem = distributed.broadcast_object(problem, d)
        if problem:
            raise ConfigError(problem)
        version = distributed.broadcast_object(max(state.version, replicas.max_version()) + 1, d)
        if version > MAX_VERSION:
            raise ConfigError(f"a policy replica serves weight version {version - 1}, the highest there is: "
                              f"restart it (a restarted replica serves version 0)")
        state.version = replicas.version = version
        replicas.attach(state.policy, services.push_scale, canary(config, state, scorer, tokenizer, d))
        replicas.on_verdict = lambda v: (control.set_canary(v), metrics.export_verdict(v))
        sync()

        progress = tqdm(total=config.steps, initial=state.step, desc="PPO", unit="step", dynamic_ncols=True,
                        disable=not d.main)
        resyncs = replicas.resyncs
        while state.step < config.steps and between_steps(control, d, stop, save, replicas):
            seconds, step_start = {}, time.perf_counter()
            if pending is None:
                with phase(seconds, Phase.SYNCING, control):
                    sync()
                pending = launch_rollout(state, config, replicas, scorer, tokenizer, d, background)
            rollout = finish_rollout(pending, state, config, replicas, scorer, d, seconds, control, sync)
            pending = None
            if background and state.step + 1 < config.steps:
                # one_step_off: the next step's rollout is generated and scored while this one
                # trains and pushes; its completions come from these weights, one version behind.
                with phase(seconds, Phase.SYNCING, control):
                    sync()
                pending = launch_rollout(state, config, replicas, scorer, tokenizer, d, background)
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
                pushed = replicas.push_all()
            state.step += 1

            m = step_metrics(state, rollout, exp, stats, beta, seconds, time.perf_counter() - step_start,
                             replicas.resyncs)
            m.push = pushed.as_dict() if pushed is not None else {}
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
        abandon(pending)
        save()
        done = state.step >= config.steps
        if config.export_merged and done:
            lora.export_merged(state.policy, pathlib.Path(config.export_merged), d, tokenizer)
        ranks = distributed.all_gather_object(state.memory_report(d))
        if d.main:
            (out / "ranks.json").write_text(json.dumps(ranks, indent=2))
        if d.main and state.history:
            metrics.plot(state.history, out)
        control.finish(Phase.FINISHED if done else Phase.FAILED, "" if done else "stopped by signal")
        return state.history
    except Stopped:
        log.warning("stopped at step %d; checkpointing", state.step)
        abandon(pending)
        save()
        control.finish(Phase.FAILED, "stopped by signal")
        return state.history
    except (DependencyDown, RequestRefused, CanaryFailed) as e:
        log.error("stopping: %s; checkpoint at step %d in %s", e, state.step, out)
        abandon(pending)
        save()
        control.finish(Phase.FAILED, str(e))
        raise SystemExit(f"PPO stopped at step {state.step}: {e}. Resume with --resume once it is fixed.") from e
    finally:
        for s, h in previous_handlers.items():
            signal.signal(s, h)
        if background:
            background.shutdown(wait=False, cancel_futures=True)
        replicas.close()
        scorer.close()
        if server:
            server.stop()


def canary(config: Config, state: PPOState, scorer: Scorer, tokenizer, d: Dist) -> Canary | None:
    """services.canary's probes (rank 0): the first prompts of the data set, fixed for the run."""
    if not config.services.canary.enabled or not d.main:
        return None  # the other ranks learn from rank 0 that there is one (PolicyReplicas.attach)
    prompts = state.prompts.prompts[:config.services.canary.probes]
    ids = [tokenizer(formats.render_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]
    return Canary(config.services.canary, prompts, ids, scorer.score, config.ppo.normalize_scores)


def main(args) -> int:
    from services.common.malloc import reuse_large_buffers

    try:
        config = load_config(args)
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


def load_config(args) -> Config:
    from services.trainer.config import from_args
    return from_args(Config, args, FLAGS)


# config key -> the attribute of the parsed CLI arguments that sets it
FLAGS = {"policy_addresses": "policy_addresses", "reward_address": "reward_address", "sft_model": "sft_model",
         "reward_model": "reward_model", "prompts": "prompts", "out": "out", "steps": "steps", "device": "device",
         "dtype": "dtype", "export_merged": "export_merged"}
