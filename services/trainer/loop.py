"""Online PPO against live policy and reward services (`rlhf train ppo`).

One step, top to bottom (InstructGPT's recipe, CleanRL's layout):
    prompts -> Generate on the policy replicas -> Score on the reward service
    -> logprobs of policy and frozen reference, values -> per-token KL penalty + score
    -> GAE -> whitened advantages -> PPO epochs x minibatches -> push weights (version + 1).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pathlib
import random
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from services.common.config import ClientConfig, ServerConfig
from services.common.malloc import reuse_large_buffers
from services.common.text import format_prompt
from services.trainer import checkpoint, metrics
from services.trainer.config import Config, ConfigError, load, to_dict
from services.trainer.control import Control
from services.trainer.ppo import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae,
                                  logprobs_from_logits, masked_mean, masked_whiten, policy_loss, shape_rewards,
                                  value_loss)
from services.trainer.rollout import Backoff, DependencyDown, PolicyReplicas, Scorer

log = logging.getLogger(__name__)



def main(args) -> int:
    try:
        config = load(args)
    except ConfigError as e:
        print(f"rlhf train ppo: {e}", file=sys.stderr)
        return 2
    reuse_large_buffers()  # every step pushes the weights as a stream of 1 MiB buffers
    history = train(config, ClientConfig.from_args(args), ServerConfig.from_args(args), resume=args.resume)
    if not history or history[-1]["step"] < config.steps:
        return 128 + signal.SIGTERM  # stopped early (eviction, drain): not a success, resume later
    return 0


def disable_dropout(*models: torch.nn.Module) -> None:
    """Dropout makes the trainer's logprobs disagree with the sampler's: off everywhere."""
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0


def make_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict:
    """Prompts left-padded to P, responses right-padded to R: every response starts at column P,
    so one slice [P-1, P+R-1) of the logits predicts all response tokens of the batch."""
    P = max(len(p) for p in prompt_ids)
    R = max(max(len(r) for r in response_ids), 1)
    B = len(prompt_ids)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p)
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(r)] = 1
    # Positions count real tokens only, as the sampler saw them.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    response_mask = attention_mask[:, P:].float()
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                response_ids=input_ids[:, P:], response_mask=response_mask, P=P)


def policy_forward(model, batch: dict, temperature: float, idx=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logprobs of the response under `model`, and the logits they came from."""
    P = batch["P"]
    logits = model(input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx],
                   position_ids=batch["position_ids"][idx]).logits[:, P - 1:-1] / temperature
    return logprobs_from_logits(logits, batch["response_ids"][idx]), logits


def value_forward(model, batch: dict, idx=slice(None)) -> torch.Tensor:
    """V(s_t) for every response position: the reward model's head on every hidden state."""
    P = batch["P"]
    hidden = model.base_model(input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx],
                              position_ids=batch["position_ids"][idx]).last_hidden_state
    return model.score(hidden[:, P - 1:-1]).squeeze(-1).float()


class Prompts:
    """The train prompts in a seeded order per epoch; the position is checkpointed."""

    def __init__(self, path: str, seed: int):
        rows = [json.loads(line) for line in open(path) if line.strip()]
        self.prompts = [r["prompt"] for r in rows if r.get("split", "train") == "train"]
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


PHASES = {"generate": "GENERATING", "score": "SCORING", "reference": "REFERENCE", "train": "TRAINING",
          "push": "PUSHING"}


@contextlib.contextmanager
def phase(seconds: dict[str, float], name: str, control: Control):
    """Time one phase of the step and show it in GetStatus."""
    control.set_phase(PHASES[name])
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def train(config: Config, client_config: ClientConfig, server_config: ServerConfig | None = None,
          resume: bool = False, handle_signals: bool = True) -> list[dict]:
    """Run config.steps PPO steps; returns the per-step metrics. With handle_signals, SIGTERM
    and SIGINT finish the current step and checkpoint instead of killing the run."""
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    cfg_ppo, cfg_roll = config.ppo, config.rollout

    # Models: policy (trainable, from SFT), reference (frozen SFT), value (from the reward model).
    tokenizer = AutoTokenizer.from_pretrained(config.sft_model)
    assert tokenizer.eos_token_id != tokenizer.pad_token_id, "EOS and PAD must be distinct tokens"
    policy = AutoModelForCausalLM.from_pretrained(config.sft_model, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(config.sft_model, dtype=torch.float32).eval().requires_grad_(False)
    value = AutoModelForSequenceClassification.from_pretrained(config.reward_model, num_labels=1, dtype=torch.float32)
    disable_dropout(policy, reference, value)
    policy.train(), value.train()
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=cfg_ppo.lr, eps=1e-5)
    value_opt = torch.optim.AdamW(value.parameters(), lr=cfg_ppo.value_lr or cfg_ppo.lr, eps=1e-5)
    warmup = lambda s: min(1.0, (s + 1) / max(cfg_ppo.warmup_steps, 1))  # noqa: E731
    policy_sched = torch.optim.lr_scheduler.LambdaLR(policy_opt, warmup)
    value_sched = torch.optim.lr_scheduler.LambdaLR(value_opt, warmup)
    kl_ctl = (AdaptiveKLController(cfg_ppo.beta, cfg_ppo.target_kl, cfg_ppo.kl_horizon) if cfg_ppo.target_kl
              else FixedKLController(cfg_ppo.beta))
    prompts = Prompts(config.prompts, config.seed)

    control = Control(config.steps)
    backoff = Backoff(config.services.retry_initial_s, config.services.retry_max_s,
                      config.services.dependency_deadline_s)
    replicas = PolicyReplicas(config.policy_addresses, client_config, backoff, config.services.rpc_timeout_s)
    scorer = Scorer(config.reward_address, client_config, backoff, config.services.rpc_timeout_s)
    server = None
    if server_config is not None:
        from services.common.server import BackgroundServer
        from services.trainer.server import TrainerServicer
        server = BackgroundServer(server_config, TrainerServicer(control)).start()

    step, version, history = 0, 0, []
    if resume and (path := checkpoint.latest(out)):
        policy.load_state_dict(AutoModelForCausalLM.from_pretrained(path / "policy", dtype=torch.float32).state_dict())
        value.load_state_dict(AutoModelForSequenceClassification.from_pretrained(
            path / "value", num_labels=1, dtype=torch.float32).state_dict())
        state = checkpoint.load_state(path)
        policy_opt.load_state_dict(state["policy_opt"])
        value_opt.load_state_dict(state["value_opt"])
        policy_sched.load_state_dict(state["policy_sched"])
        value_sched.load_state_dict(state["value_sched"])
        kl_ctl.load_state_dict(state["kl_ctl"])
        prompts.load_state_dict(state["prompts"])
        step, version, history = state["step"], state["weight_version"], state["history"]
        control.history = list(history)
        log.info("resumed from %s at step %d (weight version %d)", path, step, version)

    def save_checkpoint() -> pathlib.Path:
        control.set_phase("CHECKPOINTING")
        return checkpoint.save(out, step, policy=policy, value=value, tokenizer=tokenizer, state=dict(
            policy_opt=policy_opt.state_dict(), value_opt=value_opt.state_dict(),
            policy_sched=policy_sched.state_dict(), value_sched=value_sched.state_dict(),
            kl_ctl=kl_ctl.state_dict(), prompts=prompts.state_dict(), weight_version=version, history=history))

    def serve_checkpoint_requests() -> None:
        for request in control.take_checkpoint_requests():
            request.set_result((save_checkpoint(), step))

    def on_wait(message: str) -> None:
        control.set_phase("WAITING", message)

    # SIGTERM (Kubernetes eviction): finish the step, checkpoint, exit.
    stopping = []

    def on_signal(*_):
        stopping.append(True)
        control.resume()  # a paused run must wake up to stop

    previous_handlers = ({s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
                         if handle_signals else {})

    try:
        rm_info = scorer.model_info()
        score_mean, score_std = ((rm_info.score_mean, rm_info.score_std or 1.0) if cfg_ppo.normalize_scores
                                 else (0.0, 1.0))
        # Bring every replica to the trainer's weights first: a fresh start or a resume alike.
        # Versions only go up, so the trainer's version continues above anything a replica serves.
        control.set_phase("SYNCING")
        replicas.refresh()
        named_tensors = policy.state_dict  # the client sends tied aliases once; unknown names are refused
        version = max(version, replicas.max_version()) + 1
        replicas.push(named_tensors, version)
        replicas.sync(named_tensors, version, on_wait)

        sampling = dict(max_tokens=cfg_roll.max_tokens, temperature=cfg_roll.temperature, top_p=cfg_roll.top_p,
                        logprobs=True)
        progress = tqdm(total=config.steps, initial=step, desc="PPO", unit="step", dynamic_ncols=True)
        while step < config.steps and not stopping:
            control.wait_if_paused(serve_checkpoint_requests)
            if stopping:
                break
            seconds, step_start = {}, time.perf_counter()

            # 1. Rollout: sample completions from the live policy replicas.
            batch_prompts = prompts.next(cfg_roll.batch_size)
            prompt_ids = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False).input_ids
                          for p in batch_prompts]
            with phase(seconds, "generate", control):
                results = replicas.generate(prompt_ids, version, sampling, named_tensors, on_wait)
            completions = [r.completions[0] for r in results]
            # Never train on completions from other weights: count them, drop them.
            keep = [i for i, c in enumerate(completions)
                    if 0 <= version - c.weight_version <= config.services.max_staleness]
            # An empty answer (EOS at once) has no text to score: it leaves the batch, counted.
            empty = sum(not completions[i].text.strip() for i in keep)
            keep = [i for i in keep if completions[i].text.strip()]
            dropped = len(completions) - len(keep) - empty
            keep = keep[:len(keep) - len(keep) % cfg_ppo.minibatch_size] or keep
            if not keep:
                log.warning("step %d: no usable completion, sampling again", step)
                continue

            # 2. Score each (prompt, response) with the reward model.
            with phase(seconds, "score", control):
                raw_scores = scorer.scores([(batch_prompts[i], completions[i].text) for i in keep], on_wait)
            scores = torch.tensor(raw_scores)

            # 3. Old logprobs (recomputed here, not trusted from the sampler), reference logprobs, values.
            batch = make_batch([prompt_ids[i] for i in keep], [list(completions[i].token_ids) for i in keep],
                               tokenizer.pad_token_id)
            mask = batch["response_mask"]
            with phase(seconds, "reference", control), torch.no_grad():
                old_logprobs, _ = policy_forward(policy, batch, cfg_roll.temperature)
                ref_logprobs, _ = policy_forward(reference, batch, cfg_roll.temperature)
                old_values = value_forward(value, batch)
                sampler_logprobs = torch.zeros_like(old_logprobs)
                for row, i in enumerate(keep):
                    lp = completions[i].logprobs
                    sampler_logprobs[row, :len(lp)] = torch.tensor(lp)
                logprob_gap = masked_mean((old_logprobs - sampler_logprobs).abs(), mask).item()
                missing_eos = torch.tensor([completions[i].finish_reason == "length" for i in keep])
                rewards, kl, score = shape_rewards(
                    scores, old_logprobs, ref_logprobs, mask, kl_ctl.value, kl_estimator=cfg_ppo.kl_estimator,
                    missing_eos=missing_eos, missing_eos_penalty=cfg_ppo.missing_eos_penalty,
                    score_mean=score_mean, score_std=score_std, score_clip=cfg_ppo.score_clip)
                advantages, returns = gae(rewards, old_values, mask, cfg_ppo.gamma, cfg_ppo.lam)
                advantages = masked_whiten(advantages, mask)

            # 4. PPO epochs x minibatches: clipped ratio loss, clipped value loss, entropy bonus.
            stats = {"pg": [], "vf": [], "clip": [], "approx_kl": [], "entropy": []}
            with phase(seconds, "train", control):
                n = len(keep)
                for _ in range(cfg_ppo.epochs):
                    for mb in torch.randperm(n).split(cfg_ppo.minibatch_size):
                        new_logprobs, logits = policy_forward(policy, batch, cfg_roll.temperature, mb)
                        pg_loss, clipfrac, approx_kl = policy_loss(new_logprobs, old_logprobs[mb], advantages[mb],
                                                                   mask[mb], cfg_ppo.clip)
                        entropy = masked_mean(entropy_from_logits(logits), mask[mb])
                        new_values = value_forward(value, batch, mb)
                        vf_loss, _ = value_loss(new_values, old_values[mb], returns[mb], mask[mb], cfg_ppo.value_clip)
                        loss = pg_loss - cfg_ppo.ent_coef * entropy + cfg_ppo.vf_coef * vf_loss
                        policy_opt.zero_grad(set_to_none=True)
                        value_opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg_ppo.max_grad_norm)
                        torch.nn.utils.clip_grad_norm_(value.parameters(), cfg_ppo.max_grad_norm)
                        policy_opt.step()
                        value_opt.step()
                        for key, v in (("pg", pg_loss), ("vf", vf_loss), ("clip", clipfrac),
                                       ("approx_kl", approx_kl), ("entropy", entropy)):
                            stats[key].append(v.item())
                policy_sched.step()
                value_sched.step()
            mean_kl = kl.sum(-1).mean().item()
            beta = kl_ctl.value
            kl_ctl.update(mean_kl, n)

            # 5. Push the new weights to every replica as version + 1.
            with phase(seconds, "push", control):
                version += 1
                replicas.push(named_tensors, version)
            step += 1

            generated = sum(len(c.token_ids) for c in completions)
            m = dict(step=step, weight_version=version - 1, pushed_version=version, time=time.time(),
                     reward_mean=float(np.mean(raw_scores)), score_mean=score.mean().item(), kl=mean_kl,
                     entropy=float(np.mean(stats["entropy"])), clip_fraction=float(np.mean(stats["clip"])),
                     approx_kl=float(np.mean(stats["approx_kl"])), policy_loss=float(np.mean(stats["pg"])),
                     value_loss=float(np.mean(stats["vf"])), beta=beta,
                     tokens_per_second=generated / (time.perf_counter() - step_start),
                     logprob_gap=logprob_gap, completions=n, completions_dropped=dropped, completions_empty=empty,
                     generated_tokens=generated,
                     trained_versions=sorted({completions[i].weight_version for i in keep}),
                     prompts_sha=hashlib.sha256("\n".join(batch_prompts).encode()).hexdigest()[:16],
                     missing_eos_share=missing_eos.float().mean().item(),
                     response_length=mask.sum(-1).mean().item(), replica_resyncs=replicas.resyncs,
                     phase_seconds=seconds)
            history.append(m)
            control.weight_version = version
            control.replicas = replicas.status(version)
            control.record(m)
            metrics.export(m)
            metrics.REPLICAS_IN_SYNC.set(sum(r["in_sync"] for r in control.replicas))
            metrics.append_jsonl(out / "metrics.jsonl", m)
            progress.update(1)
            progress.set_postfix(reward=f"{m['reward_mean']:.3f}", kl=f"{mean_kl:.3f}", beta=f"{beta:.3f}")
            log.info("step %d/%d reward %.3f kl %.3f entropy %.3f clip %.3f tok/s %.0f %s", step, config.steps,
                     m["reward_mean"], mean_kl, m["entropy"], m["clip_fraction"], m["tokens_per_second"],
                     " ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))

            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint()
            serve_checkpoint_requests()
        progress.close()
        save_checkpoint()
        serve_checkpoint_requests()
        if history:
            metrics.plot(history, out)
        control.finish("FINISHED" if step >= config.steps else "FAILED",
                       "" if step >= config.steps else "stopped by signal")
        return history
    except DependencyDown as e:
        log.error("stopping: %s; checkpoint at step %d in %s", e, step, out)
        save_checkpoint()
        control.finish("FAILED", str(e))
        raise SystemExit(f"PPO stopped at step {step}: {e}. Resume with --resume once it is back.") from e
    finally:
        for s, h in previous_handlers.items():
            signal.signal(s, h)
        replicas.close()
        scorer.close()
        if server:
            server.stop()
