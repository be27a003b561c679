"""PPO run configuration: a YAML file, then `--set key=value` and named flags on top."""
from __future__ import annotations

import argparse
import dataclasses
import pathlib

import yaml


class ConfigError(SystemExit):
    """A bad config exits with status 2, like a bad flag (a Kubernetes Job then fails
    at once instead of retrying a run that cannot start)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass
class RolloutConfig:
    batch_size: int = 64          # prompts per PPO step
    max_tokens: int = 64          # completion length limit
    temperature: float = 1.0
    top_p: float = 1.0


@dataclasses.dataclass
class PPOConfig:
    epochs: int = 2               # passes over one step's batch
    minibatch_size: int = 16
    lr: float = 1e-5              # policy learning rate
    value_lr: float | None = None  # default: lr
    warmup_steps: int = 0
    clip: float = 0.2             # epsilon of the ratio clip
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    beta: float = 0.05            # KL coefficient (initial, when target_kl is set)
    target_kl: float | None = None  # set: adapt beta to this per-sequence KL (Ziegler et al.)
    kl_horizon: int = 10000
    kl_estimator: str = "k1"      # k1 or k3
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 1.0
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of completions cut at max_tokens
    normalize_scores: bool = True  # with the reward model's training mean/std
    score_clip: float | None = 5.0


@dataclasses.dataclass
class ServicesConfig:
    max_staleness: int = 0        # completions this many versions behind are still used
    rpc_timeout_s: float = 120.0
    dependency_deadline_s: float = 300.0  # a dependency down longer than this stops the run
    retry_initial_s: float = 0.5
    retry_max_s: float = 10.0


@dataclasses.dataclass
class Config:
    policy_addresses: list[str] = dataclasses.field(default_factory=list)
    reward_address: str = ""
    sft_model: str = ""
    reward_model: str = ""
    prompts: str = ""
    out: str = "runs/ppo"
    steps: int = 100
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 10    # steps; 0 = only at the end
    eval_prompts: int = 0         # held-out prompts sampled for the final report (0 = off)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    services: ServicesConfig = dataclasses.field(default_factory=ServicesConfig)

    def validate(self) -> "Config":
        problems = []
        if not self.policy_addresses:
            problems.append("policy_addresses: at least one policy replica is needed")
        for key in ("reward_address", "sft_model", "reward_model", "prompts"):
            if not getattr(self, key):
                problems.append(f"{key} is required")
        if self.ppo.kl_estimator not in ("k1", "k3"):
            problems.append(f"ppo.kl_estimator must be k1 or k3, got {self.ppo.kl_estimator!r}")
        if self.rollout.batch_size % self.ppo.minibatch_size:
            problems.append(f"rollout.batch_size ({self.rollout.batch_size}) must be a multiple of "
                            f"ppo.minibatch_size ({self.ppo.minibatch_size})")
        if problems:
            raise ConfigError("invalid PPO config:\n  " + "\n  ".join(problems))
        return self


def _apply(obj, data: dict, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(fields)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix}{key} must be a mapping")
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, value)


def load(args: argparse.Namespace) -> Config:
    """The file, then --set overrides, then the named flags."""
    config = Config()
    if args.config:
        _apply(config, yaml.safe_load(pathlib.Path(args.config).read_text()) or {})
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set wants KEY=VALUE, got {item!r}")
        nested: dict = {}
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
        _apply(config, nested)
    for flag, key in [("policy_addresses", "policy_addresses"), ("reward_address", "reward_address"),
                      ("sft_model", "sft_model"), ("reward_model", "reward_model"), ("prompts", "prompts"),
                      ("out", "out"), ("steps", "steps")]:
        value = getattr(args, flag, None)
        if value is not None:
            setattr(config, key, value)
    return config.validate()


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
