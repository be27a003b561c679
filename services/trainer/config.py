"""What a training job is told, type- and range-checked when it loads (pydantic).

A YAML file (--config), then `--set key.sub=value` overrides (the value is read as YAML), then the
named flags. Every key is checked at load, before any model is read: an unknown key, a wrong type
or a value out of range is an error that names the key, and the command exits with code 2 (a
Kubernetes Job must not retry a bad config; the manifests' podFailurePolicy fails the Job on 2).

The defaults are for real models (a 1B-70B Hugging Face checkpoint), close to what TRL and
OpenRLHF default to; the demo's tiny model from random init keeps its own values in
services/demo/pipeline.py.

Why pydantic: one declaration gives types, ranges, defaults, the errors with the key's path and
the effective config for --print-config; YAML's own typing ("3e-6" is a string in YAML 1.1) is
fixed by pydantic's number parsing.
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.config import load_yaml, read_config, shorten


class ConfigError(ValueError):
    """A bad config: the CLI prints it and exits with code 2."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# How long a rank waits for the others in one collective before the job fails. Longer than the
# longest a rank may legitimately keep the others waiting: retrying a dependency that is down
# (services.dependency_deadline_s, 5 minutes, plus one RPC) before every rank learns the run
# stops (checked in Config); rank 0 writing a checkpoint's Hugging Face export. Short enough that
# a rank that hangs ends the job in minutes, not half an hour (docs/training.md).
COLLECTIVE_TIMEOUT_S = 600.0

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16"]


class LoRA(Section):
    """Train low-rank adapters instead of the whole model (peft): W' = W + (alpha / rank) B A on
    every targeted weight, W frozen. Off while rank is 0. docs/training.md, "LoRA"."""
    rank: int = Field(0, ge=0)  # r of A [r, in] and B [out, r]; 0: full fine-tuning
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapter's input (sft, rm; ppo wants 0)
    # all-linear: every linear layer of the decoder (attention and MLP projections), not the LM
    # head or the score head; or a list of module names (suffixes), e.g. [q_proj, v_proj].
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    name: str = ""  # the adapter's name on the policy service; default: the run's output directory name

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class Job(Section):
    """What every training job has."""
    out: str
    seed: int = Field(0, ge=0)
    device: Device = "auto"  # auto: cuda:LOCAL_RANK when CUDA is there, else the CPU
    dtype: DType = "auto"  # auto: bfloat16 compute on GPUs that have it, float32 elsewhere
    collective_timeout_s: float = Field(COLLECTIVE_TIMEOUT_S, gt=0)  # seconds; see COLLECTIVE_TIMEOUT_S
    lora: LoRA = LoRA()
    export_merged: str | None = None  # with lora: also write base + adapter merged, a plain Hugging Face model

    @model_validator(mode="after")
    def _lora(self) -> "Job":
        if self.export_merged and not self.lora.enabled:
            raise ValueError("export_merged needs lora.rank > 0: without adapters the output is a whole model already")
        if self.lora.enabled and not self.lora.name:
            self.lora.name = pathlib.PurePath(self.out).name
        return self


# ---- supervised jobs -------------------------------------------------------------------------

class Supervised(Job):
    model: str  # Hugging Face directory to start from
    data: str  # JSONL, JSON or Parquet file, a save_to_disk directory, or a hub id (TRL formats: see formats.py)
    data_split: str = "train"  # of a directory or hub data set with several
    columns: dict[str, str] = {}  # our column name -> yours, e.g. {"prompt": "question", "completion": "answer"}
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(32, ge=1)  # examples (pairs for rm) per optimizer step, over all ranks
    max_length: int = Field(1024, ge=2)  # tokens per example
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # stop after this many steps (tests, smoke runs)


class SFTConfig(Supervised):
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(1e-5, gt=0)


class ReplayConfig(Section):
    """Old comparisons mixed into a refresh (`init`), so the model keeps what it knew."""
    data: str  # a data set in a TRL preference format, e.g. the one the served model was trained on
    share: float = Field(0.5, ge=0, lt=1)  # of the training mix: share / (1 - share) old pairs per new pair
    columns: dict[str, str] = {}
    data_split: str = "train"


class RMConfig(Supervised):
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-5, gt=0)
    model: str | None = None  # required unless init is given
    # A refresh: continue from this trained reward model (the served one; its score head too) on `data`
    # (e.g. the feedback database, sqlite:///... or postgresql://...), and report accuracy before and after.
    init: str | None = None
    replay: ReplayConfig | None = None

    @model_validator(mode="after")
    def _start(self) -> "RMConfig":
        if self.model is None and self.init is None:
            raise ValueError("model is required (or init: the reward model a refresh continues from)")
        if self.model is not None and self.init is not None and self.model != self.init:
            raise ValueError(f"give model or init, not both: init continues from a trained reward model "
                             f"(model {self.model!r}, init {self.init!r})")
        if self.model is None:
            self.model = self.init
        return self


# ---- PPO -------------------------------------------------------------------------------------

class RolloutConfig(Section):
    batch_size: int = Field(64, ge=1)  # prompts per PPO step, over all ranks
    n: int = Field(1, ge=1)  # completions per prompt (a group); grpo and rloo need 2 or more
    # sync: generate, then train. one_step_off: the next step's rollout is generated and scored
    # while this step trains and pushes, so its completions are one weight version old.
    mode: Literal["sync", "one_step_off"] = "sync"
    max_tokens: int = Field(256, ge=1)  # completion length limit
    temperature: float = Field(1.0, gt=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)


class PPOConfig(Section):
    # gae: PPO with a critic initialised from the reward model (the classic recipe). Critic-free,
    # no value model loaded: grpo (group-relative), rloo (leave-one-out), reinforce_pp (batch baseline).
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # grpo: divide by the group's std, the batch's, or not
    kl_in: Literal["reward", "loss"] = "reward"  # the KL penalty as a per-token reward, or as a loss term
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean"
    epochs: int = Field(1, ge=1)  # passes over one step's batch
    minibatch_size: int = Field(16, ge=1)  # completions per optimizer step, over all ranks
    lr: float = Field(1e-6, gt=0)  # policy learning rate
    value_lr: float | None = Field(None, gt=0)  # default: 10 x lr
    warmup_steps: int = Field(0, ge=0)
    clip: float = Field(0.2, gt=0)  # epsilon of the ratio clip
    value_clip: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    beta: float = Field(0.05, ge=0)  # KL coefficient (initial, when target_kl is set)
    target_kl: float | None = Field(None, gt=0)  # set: adapt beta to this per-sequence KL (Ziegler et al.)
    kl_horizon: int = Field(10000, ge=1)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    vf_coef: float = Field(0.5, ge=0)
    ent_coef: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    missing_eos_penalty: float | None = Field(1.0, ge=0)  # subtracted from the score of completions cut at max_tokens
    normalize_scores: bool = True  # with the reward model's training mean/std
    score_clip: float | None = Field(5.0, gt=0)
    # Weight each token by min(pi_proximal / pi_sampler, is_cap): the correction for completions
    # sampled by older weights (one_step_off) or another engine's numerics. auto: tis in
    # one_step_off, none in sync.
    is_correction: Literal["auto", "none", "tis"] = "auto"
    is_cap: float = Field(2.0, ge=1)


class CanaryConfig(Section):
    """Each push goes to one replica first; probes compare it with the version before."""
    enabled: bool = False
    probes: int = Field(8, ge=1)  # the first prompts of the prompt data set, the same ones every push
    max_tokens: int = Field(32, ge=1)  # completion length on the probes
    max_kl: float = Field(0.1, gt=0)  # mean per-token KL(v-1 || v) on v-1's samples, nats; above: roll back, stop
    max_score_drop: float | None = Field(1.0, gt=0)  # mean probe score may fall by at most this (None: not checked)


class PPOLoRA(LoRA):
    # How new weights reach the policy replicas. merged: W + (alpha / rank) B A of every targeted
    # weight, under the full model's names (a fleet without vLLM's --enable-lora takes it).
    push: Literal["merged"] = "merged"


class ServicesConfig(Section):
    max_staleness: int = Field(0, ge=0)  # completions this many versions behind are still used
    rpc_timeout_s: float = Field(120.0, gt=0)
    dependency_deadline_s: float = Field(300.0, gt=0)  # a dependency failing longer than this stops the run
    retry_initial_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(10.0, gt=0)
    # The weight path (docs/deploy.md, "Weight pushes"). delta: only the elements whose served bits
    # changed, to replicas at the previous version (the others get a full push); full: every byte.
    push: Literal["full", "delta"] = "delta"
    # each: a replica serves the new version once it has it; all: every replica stages it, then all
    # commit, or none does (all keep the version before).
    push_commit: Literal["each", "all"] = "each"
    push_fanout: int = Field(1, ge=1, le=64)  # replicas pass a push on to this many others: 1 = a chain
    canary: CanaryConfig = CanaryConfig()
    # TESTS ONLY: multiply the pushed weights by this factor, a broken update on purpose (the
    # canary's test). Never set it in a real run.
    push_scale: float = Field(1.0, gt=0)


class Config(Job):
    """`rlhf train ppo`."""
    policy_addresses: list[str] = Field(min_length=1)  # host:port each, or dns:///name:port for every replica
    reward_address: str = Field(min_length=1)
    sft_model: str = Field(min_length=1)  # the policy's start and the frozen reference
    reward_model: str | None = Field(None, min_length=1)  # the value model's start (gae only)
    prompts: str = Field(min_length=1)  # data set with a "prompt" per row: a string or a conversation
    data_split: str = "train"
    columns: dict[str, str] = {}  # e.g. {"prompt": "question"}
    out: str = "runs/ppo"
    steps: int = Field(100, ge=1)
    checkpoint_every: int = Field(10, ge=0)  # steps; 0 = only at the end
    rollout: RolloutConfig = RolloutConfig()
    ppo: PPOConfig = PPOConfig()
    services: ServicesConfig = ServicesConfig()
    lora: PPOLoRA = PPOLoRA()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        rollout, ppo = self.rollout, self.ppo
        if self.lora.dropout:
            raise ValueError(f"lora.dropout must be 0 for ppo (got {self.lora.dropout}): the update's ratio compares "
                             f"two passes over the same tokens, and dropout would make them differ")
        if rollout.batch_size * rollout.n % ppo.minibatch_size:
            raise ValueError(f"rollout.batch_size x rollout.n ({rollout.batch_size} x {rollout.n}) must be a multiple "
                             f"of ppo.minibatch_size ({ppo.minibatch_size})")
        if ppo.advantage in ("grpo", "rloo"):
            if rollout.n < 2:
                raise ValueError(f"ppo.advantage {ppo.advantage} compares the completions of a prompt: "
                                 f"rollout.n must be >= 2, got {rollout.n}")
        if rollout.mode == "one_step_off" and self.services.max_staleness < 1:
            raise ValueError("rollout.mode one_step_off trains on completions one weight version old: "
                             f"services.max_staleness must be >= 1, got {self.services.max_staleness}")
        waits = self.services.dependency_deadline_s + self.services.rpc_timeout_s
        if self.collective_timeout_s <= waits:
            raise ValueError(f"collective_timeout_s ({self.collective_timeout_s:g}) must exceed "
                             f"services.dependency_deadline_s + services.rpc_timeout_s ({waits:g}): a rank retrying "
                             "a dependency keeps the others waiting in a collective that long before all stop")
        if ppo.advantage == "gae" and not self.reward_model:
            raise ValueError("reward_model is required with ppo.advantage gae (the value model starts from it)")
        return self

    @property
    def is_correction(self) -> bool:
        """Whether tokens are weighted by the truncated importance ratio (ppo.is_correction)."""
        if self.ppo.is_correction == "auto":
            return self.rollout.mode == "one_step_off"
        return self.ppo.is_correction == "tis"

    @property
    def critic(self) -> bool:
        """Whether a value model is loaded, trained and checkpointed."""
        return self.ppo.advantage == "gae"


def check_fleet(config: Config, world_size: int, policies: dict, reward, longest_prompt: tuple[int, int]) -> None:
    """What the live services will refuse, said before the first step (ConfigError naming the key,
    the limit and the replica) instead of as a refused call mid-run.

    `policies` maps each replica's address to its GetModelInfo answer, `reward` is the reward
    service's (both read by attribute: max_n, max_prompts, max_model_len; max_length).
    `longest_prompt` is (tokens, index in the prompt data set) of the longest rendered prompt.
    A rank sends all its prompts of a step in one Generate when one replica is left; its Score
    calls are cut to the reward service's max_pairs (Scorer.score), so that limit needs no check."""
    rollout = config.rollout
    prompts_per_call = -(-rollout.batch_size // world_size)
    problems = []
    for address, info in sorted(policies.items()):
        where = f"policy replica {address}"
        if rollout.n > info.max_n:
            problems.append(f"rollout.n is {rollout.n}, above {where}'s limit of {info.max_n} completions per "
                            f"prompt (its --max-n)")
        if prompts_per_call > info.max_prompts:
            problems.append(f"rollout.batch_size / ranks is {prompts_per_call} prompts per Generate call, above "
                            f"{where}'s limit of {info.max_prompts} (its --max-prompts)")
        tokens, index = longest_prompt
        if tokens + rollout.max_tokens > info.max_model_len:
            problems.append(f"prompt {index} of {config.prompts} is {tokens} tokens, and with rollout.max_tokens "
                            f"{rollout.max_tokens} that is more than {where}'s max_model_len {info.max_model_len}")
    if reward.max_length and rollout.max_tokens + 1 > reward.max_length:
        problems.append(f"rollout.max_tokens {rollout.max_tokens} (+ EOS) is more than the reward model's max length "
                        f"{reward.max_length}: a completion that long cannot be scored")
    if problems:
        raise ConfigError("the services refuse what this config asks for:\n  " + "\n  ".join(problems))


# ---- loading ---------------------------------------------------------------------------------

def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        tree = node
    tree[leaf] = value


def load(cls: type[Section], path: str | None = None, sets: list[str] = (), flags: dict | None = None):
    """The config from a YAML file, --set KEY=VALUE overrides and flags (None = not given)."""
    tree: dict = {}
    if path:
        try:
            tree = load_yaml(read_config(path, f"--config {path}"), f"--config {path}") or {}
        except ValueError as e:  # load_yaml's own: it names the file
            raise ConfigError(shorten(str(e))) from None
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(shorten(f"--config {path}: {e}")) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path} must hold a mapping of keys, got {type(tree).__name__}")
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            value = load_yaml(raw, f"--set {key}")
        except ValueError as e:
            raise ConfigError(shorten(str(e))) from None
        except yaml.YAMLError as e:
            raise ConfigError(shorten(f"--set {key}: {e}")) from None
        _set(tree, key, value)
    for key, value in (flags or {}).items():
        if value is not None:
            _set(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        given = f" (got {shorten(repr(err['input']), 200)})" if err["type"] not in ("missing",) and "input" in err else ""
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message}{given}" if err["type"] != "missing" else f"{key} is required")
    return "invalid config:\n  " + "\n  ".join(lines)


def dump(config: Section) -> str:
    """The effective config as YAML, defaults included (`--print-config`)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def from_args(cls: type[Section], args: argparse.Namespace, flags: dict[str, str]):
    """load() from the parsed CLI: flags maps a config key to the attribute of `args` holding it;
    --prompt-key and the like go to `columns`."""
    given = {key: getattr(args, attr, None) for key, attr in flags.items()}
    given |= {f"columns.{name}": getattr(args, f"{name}_key", None) for name in COLUMN_FLAGS}
    return load(cls, args.config, args.set, given)


COLUMN_FLAGS = ("prompt", "completion", "response", "chosen", "rejected", "messages", "text")
