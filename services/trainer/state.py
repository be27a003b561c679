"""What a PPO run carries from step to step, and what its checkpoints hold: the models, their
optimizers and schedulers, the KL controller, and the position in the prompts."""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib

import numpy as np
import torch

from services.trainer import checkpoint, distributed, formats, lora
from services.trainer.config import Config, ConfigError
from services.trainer.distributed import Dist
from services.trainer.metrics import StepMetrics
from services.trainer.ppo import AdaptiveKLController, FixedKLController


class Prompts:
    """The train prompts (strings or conversations) in a seeded order per epoch; the position is
    checkpointed."""

    def __init__(self, path: str, seed: int, columns: dict[str, str] | None = None, split: str = "train"):
        self.prompts = formats.prompts(formats.load_rows(path, columns, split), path)
        if not self.prompts:
            raise ConfigError(f"prompts: {path} holds no train prompts")
        self.seed, self.epoch, self.index = seed, 0, 0

    def next(self, n: int) -> list[str | list[dict]]:
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
    reference, the KL controller, the prompt position, the step and the weight version. The value
    model and its optimizer exist only with a critic (ppo.advantage gae).

    With LoRA (config.lora) the policy and the value model are frozen bases with adapters, and
    there is no reference model: the reference is the policy's base with the adapter switched
    off (reference_model()), so the trainer holds the base once."""
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    policy_opt: torch.optim.Optimizer
    policy_sched: torch.optim.lr_scheduler.LRScheduler
    kl_ctl: FixedKLController | AdaptiveKLController
    prompts: Prompts
    value: torch.nn.Module | None = None
    value_opt: torch.optim.Optimizer | None = None
    value_sched: torch.optim.lr_scheduler.LRScheduler | None = None
    step: int = 0
    version: int = 0
    history: list[StepMetrics] = dataclasses.field(default_factory=list)
    prompts_in_flight: dict | None = None  # the prompt position before a rollout that is not trained on yet

    @classmethod
    def build(cls, config: Config, d: Dist) -> "PPOState":
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cfg = config.ppo
        warmup = lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1))  # noqa: E731
        for key in ("sft_model", "reward_model"):
            if getattr(config, key):
                lora.check_not_adapter(getattr(config, key), key)
        adapters = config.lora if config.lora.enabled else None
        policy = distributed.load_model(AutoModelForCausalLM, config.sft_model, d, lora=adapters, seed=config.seed)
        reference = (None if adapters else
                     distributed.load_model(AutoModelForCausalLM, config.sft_model, d, trainable=False))
        policy_opt = torch.optim.AdamW(lora.trainable(policy), lr=cfg.lr, eps=1e-5)
        kl_ctl = (AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl
                  else FixedKLController(cfg.beta))
        state = cls(policy, reference, policy_opt, torch.optim.lr_scheduler.LambdaLR(policy_opt, warmup), kl_ctl,
                    Prompts(config.prompts, config.seed, config.columns, config.data_split))
        if config.critic:
            state.value = distributed.load_model(AutoModelForSequenceClassification, config.reward_model, d,
                                                 lora=adapters, seed=config.seed, num_labels=1)
            state.value_opt = torch.optim.AdamW(lora.trainable(state.value), lr=cfg.value_lr or 10 * cfg.lr, eps=1e-5)
            state.value_sched = torch.optim.lr_scheduler.LambdaLR(state.value_opt, warmup)
        return state

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen SFT policy for the with block: the reference model, or with LoRA the
        policy with its adapter switched off (the same base, no second copy)."""
        if self.reference is not None:
            yield self.reference
        else:
            with lora.disabled(self.policy) as base:
                yield base

    def models(self) -> list[torch.nn.Module]:
        return [m for m in (self.policy, self.reference, self.value) if m is not None]

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizers step: the whole policy and value model, or their adapters."""
        return [p for model, _ in self.trained().values() for p in lora.trainable(model)]

    def memory_report(self, d: Dist) -> dict:
        """This rank's memory (distributed.memory_report): `state_bytes` of every model it holds
        (the reference and a LoRA's frozen base included), their gradients and optimizer state;
        `trained_bytes` of the trained parameters alone, their gradients and optimizer state."""
        optimizers = [opt for _, opt in self.trained().values()]
        return {**distributed.memory_report(d, *self.models(), *optimizers),
                "trained_bytes": distributed.local_bytes(*self.trained_parameters(), *optimizers)}

    def trained(self) -> dict:
        models = {"policy": (self.policy, self.policy_opt)}
        if self.value is not None:
            models["value"] = (self.value, self.value_opt)
        return models

    def schedulers(self) -> dict:
        return {name: sched for name, sched in (("policy_sched", self.policy_sched), ("value_sched", self.value_sched))
                if sched is not None}

    def scalars(self) -> dict:
        return dict(**{k: v.state_dict() for k, v in self.schedulers().items()}, kl_ctl=self.kl_ctl.state_dict(),
                    prompts=self.prompts_in_flight or self.prompts.state_dict(), weight_version=self.version,
                    history=[m.to_json() for m in self.history])

    def save(self, out: pathlib.Path, tokenizer, d: Dist) -> pathlib.Path:
        """A checkpoint: with LoRA it holds the adapters (and their optimizer state) alone, and the
        policy's adapter in peft's format (`adapter/`) instead of the whole policy (`policy/`)."""
        servable = lora.ADAPTER_DIR if lora.is_lora(self.policy) else "policy"
        return checkpoint.save(out, self.step, d, trained=self.trained(), state=self.scalars(),
                               export=lambda path: distributed.export_hf(self.policy, tokenizer, path / servable, d))

    def load(self, path: pathlib.Path, d: Dist) -> None:
        state = checkpoint.load(path, d, trained=self.trained())
        for name, sched in self.schedulers().items():
            sched.load_state_dict(state[name])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.prompts.load_state_dict(state["prompts"])
        self.step, self.version = state["step"], state["weight_version"]
        self.history = [StepMetrics(**m) for m in state["history"]]
