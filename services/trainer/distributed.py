"""The trainer's engine: one process per device on torch.distributed, models sharded with FSDP2.

Every training job (SFT, reward model, PPO) runs through here, under `torchrun` or as a plain
process. A plain process is a group of one, so the single-device path is the same code as the
multi-node one:

    torchrun --nproc-per-node 8 --nnodes 2 ... -m services.cli train ppo --config ppo.yaml

- devices: `cuda:LOCAL_RANK` with NCCL on GPU nodes, the CPU with gloo elsewhere (tests run here);
- sharding: `fully_shard` on every decoder layer, then on the root (ZeRO-3: a rank holds 1/N of the
  parameters, gradients and AdamW moments; one layer's full parameters exist at a time);
- precision: bf16 compute with fp32 parameters, reductions and optimizer state where asked for;
- the gathers: a full state dict on rank 0 for a Hugging Face export, one parameter at a time for
  tests (`full_parameters`); a weight push gathers nothing whole (services.trainer.image: each rank
  encodes its own shard's changes);
- collectives on Python objects for the small things the ranks must agree on (a step's samples,
  a stop flag, an error on one rank that all must raise).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from services.trainer.config import COLLECTIVE_TIMEOUT_S

log = logging.getLogger(__name__)
T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process sits: its rank among world_size, its device, the compute dtype."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # the dtype models compute in; parameters and optimizer state stay fp32

    @property
    def main(self) -> bool:
        """Rank 0 talks to ops: TrainerService, metrics, logs, pushes, exports."""
        return self.rank == 0

    def rows(self, n: int) -> list[int]:
        """This rank's rows of a global batch of n: every world_size-th, starting at its rank."""
        return list(range(self.rank, n, self.world_size))


def nccl_watchdog_env(timeout_s: float) -> dict[str, tuple[str, ...] | str]:
    """What the trainer asks of NCCL's watchdog (the names torch 2.13 reads when it creates a
    ProcessGroupNCCL; older aliases in the key tuple, the first name the one set)."""
    return {
        # A collective that fails or outlasts the timeout aborts the communicators and ends the
        # process (torch's own default, 3, ends it without the abort)...
        ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"): "1",
        # ... and so does a watchdog that is itself stuck (in a CUDA call) for longer than this;
        ("TORCH_NCCL_ENABLE_MONITORING",): "1",
        ("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC",): str(max(60, int(timeout_s))),
        # one rank's NCCL error reaches the others through the store, instead of each of them
        # waiting out its own timeout.
        ("TORCH_NCCL_PROPAGATE_ERROR",): "1",
    }


def set_nccl_watchdog(timeout_s: float) -> dict[str, str]:
    """Set nccl_watchdog_env in this process's environment where the user set none of a
    setting's names; returns what was set."""
    applied = {}
    for names, value in nccl_watchdog_env(timeout_s).items():
        if not any(name in os.environ for name in names):
            os.environ[names[0]] = applied[names[0]] = value
    return applied


def init(device: str = "auto", dtype: str = "auto", timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Dist:
    """Join the process group torchrun describes in the environment, or make a group of one.

    `timeout_s` bounds how long a rank waits for the others in one collective. What happens when
    a rank dies or hangs (docs/training.md, "When a rank fails"): on gloo a dead peer's sockets
    close and the survivors' collectives fail at once, a hung one is waited for until the
    timeout; on NCCL the watchdog (set_nccl_watchdog) ends a rank whose collective failed or
    timed out. Either way the rank exits non-zero and torchrun stops the others.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    if dtype == "auto":
        dtype = "bfloat16" if use_cuda and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")

    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            applied = set_nccl_watchdog(timeout_s)  # read when the process group is created: before it
            log.debug("NCCL watchdog: %s", applied or "as the environment sets it")
        if "RANK" in os.environ:  # torchrun (or the Kubeflow operator through it)
            dist.init_process_group(backend, timeout=timeout, device_id=torch_device if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, torch_device, DTYPES[dtype])


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- models ----------------------------------------------------------------------------------

def load_model(cls, path, d: Dist, *, trainable: bool = True, lora=None, seed: int = 0,
               **config_kwargs) -> torch.nn.Module:
    """A Hugging Face model from `path`, sharded over the ranks, on this rank's device.

    Only rank 0 reads the checkpoint; the others build the model with parameters on the meta
    device (no memory) and receive their shards from rank 0. Eight ranks of a node loading a 70B
    checkpoint each would need eight copies of it in host memory.

    Trainable models keep fp32 parameters (the optimizer's master copy) and compute in d.dtype;
    a frozen model (the reference) is stored in d.dtype outright: it has no optimizer to feed.
    With `lora` (a config.LoRA that is enabled) the model is a frozen base stored in d.dtype with
    an fp32 adapter drawn from `seed` (services.trainer.lora), wrapped before it is sharded.
    Dropout is off: it would make the trainer's logprobs of a token differ between two passes.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    for key, value in list(vars(config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    adapters = lora is not None and lora.enabled
    store_dtype = torch.float32 if trainable and not adapters else d.dtype
    if d.main:
        model = cls.from_pretrained(path, config=config, dtype=store_dtype)
    else:
        with meta_parameters():
            model = cls.from_config(config, dtype=store_dtype)
    model.train(trainable).requires_grad_(trainable)
    if adapters:
        from services.trainer.lora import wrap
        task = "seq_cls" if "SequenceClassification" in type(model).__name__ else "causal_lm"
        model = wrap(model, lora, task, seed=seed, on_meta=not d.main)
    # Buffers that no checkpoint holds (rotary frequencies) were computed at construction:
    # keep them across to_empty, which leaves memory uninitialised.
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    full = model.state_dict() if d.main and d.world_size > 1 else {}  # taken before sharding replaces them
    shard(model, d, trainable=trainable)
    if d.world_size > 1:
        if not d.main:
            model.to_empty(device=d.device)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
    return model


@contextlib.contextmanager
def meta_parameters():
    """Build modules with parameters on the meta device and buffers for real.

    A parameter already on meta is kept as it is, so that tying (the LM head taking the
    embedding's parameter) still ties the two.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def shard(model: torch.nn.Module, d: Dist, *, trainable: bool = True) -> torch.nn.Module:
    """FSDP2 over every decoder layer, then the root.

    A sequence classifier (the reward and value models) also gets its backbone and its head as
    units of their own: the value model calls them one after the other (a value per position),
    not through the root's forward, and each unit gathers its parameters in its own forward.

    A model with adapters is sharded as the Hugging Face model inside peft's wrapper (the adapter
    of a layer lives in that layer's unit); the wrapper holds no parameters of its own.

    A group of one keeps the plain module on its device: there is nothing to shard, and FSDP's
    per-layer copies cost 15 % of a PPO step on the demo's model for nothing. Its bf16 compute
    then comes from autocast() instead of FSDP's MixedPrecisionPolicy.
    """
    if d.world_size == 1:
        return model.to(d.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from services.trainer.lora import base_of

    wrapper, model = model, base_of(model)

    mp = None
    if trainable and d.dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=d.dtype, reduce_dtype=torch.float32)
    # fully_shard moves each unit to the mesh's device as it shards it: one layer in full at a time.
    kwargs = {"mesh": _mesh(d.device.type, d.world_size), **({"mp_policy": mp} if mp else {})}
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules): cannot shard it")
    for layer in layers:
        fully_shard(layer, **kwargs)
    head = getattr(model, "score", None)
    if head is not None and getattr(model, "base_model", model) is not model:
        fully_shard(model.base_model, **kwargs)
        fully_shard(head, **kwargs)
    fully_shard(model, **kwargs)
    return wrapper


def autocast(d: Dist):
    """Compute in d.dtype with fp32 parameters on a single rank (FSDP's MixedPrecisionPolicy does
    it on several); a no-op in fp32."""
    if d.world_size > 1 or d.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(d.device.type, dtype=d.dtype)


@functools.cache
def _mesh(device_type: str, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (world_size,))


def local_bytes(*objects) -> int:
    """Bytes this rank holds of the given models' (or single parameters') values and gradients
    and the given optimizers' state: what sharding divides by the world size."""
    total = 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module) or torch.is_tensor(obj):
            for p in obj.parameters() if isinstance(obj, torch.nn.Module) else [obj]:
                local = p.to_local() if isinstance(p, DTensor) else p
                total += local.numel() * local.element_size()
                if p.grad is not None:
                    g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    total += g.numel() * g.element_size()
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        v = v.to_local() if isinstance(v, DTensor) else v
                        total += v.numel() * v.element_size()
    return total


def memory_report(d: Dist, *objects) -> dict:
    """This rank's memory: what it holds of the given models and optimizers, its peak resident
    set (VmHWM, Linux) and, on GPUs, the peak the CUDA allocator handed out."""
    report = {"rank": d.rank, "world_size": d.world_size, "device": str(d.device), "state_bytes": local_bytes(*objects)}
    try:
        with open("/proc/self/status") as f:
            report["peak_rss_bytes"] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    if d.device.type == "cuda":
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(d.device)
    return report


def full_parameters(model: torch.nn.Module, d: Dist) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, full tensor on rank 0's CPU | None elsewhere), one parameter at a time, in fp32 (tests
    compare trained parameters with it; pushes use services.trainer.image, which gathers nothing).

    Every rank must run this to the end (each parameter is an all-gather). Tied parameters come
    once, under their first name (the input embedding), as the policy server expects.
    """
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        yield name, (full.to("cpu") if d.main else None)
        del full


def export_hf(model: torch.nn.Module, tokenizer, out: pathlib.Path, d: Dist) -> None:
    """A Hugging Face directory of `model` written by rank 0 (config, safetensors, tokenizer):
    what a policy server loads. The full state dict is gathered to rank 0's CPU for this.

    A model with adapters (services.trainer.lora) is written as peft writes it: the adapter alone
    (adapter_config.json + adapter_model.safetensors), which peft (`PeftModel.from_pretrained(base,
    out)`) and vLLM (`--enable-lora --lora-modules name=out`) load; only the adapter is gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from services.trainer.lora import is_lora

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=is_lora(model)))
    # A tied head gathers as a tensor of its own; named_parameters() lists the tie once, and the
    # config's tie_word_embeddings rebuilds it on load.
    keep = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    state = {name: t for name, t in state.items() if name in keep}
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    del state
    dist.barrier()


# ---- agreeing on things ----------------------------------------------------------------------
#
# In a group of one every collective is the identity, and it is skipped: gloo runs a collective
# on a worker thread of its own, and the tensor copies it makes there start a second OpenMP
# thread pool in the process. libgomp then has more threads than CPUs to manage, and cuts the
# spin-wait of *every* pool short: the training loop's OpenMP workers go to sleep between
# parallel regions instead of spinning (thousands of context switches an update; measured with
# bench/ppo.py --compare).

def all_gather_object(obj: T) -> list[T]:
    if dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, d: Dist) -> T:
    """Rank 0's `obj` on every rank."""
    if d.world_size == 1:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_max(flags: list[bool], d: Dist) -> list[bool]:
    """Element-wise: true on every rank where it is true on any."""
    if d.world_size == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Element-wise sums over the ranks, in float64 so that counts stay exact."""
    if d.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


class RankFailed(RuntimeError):
    """Another rank failed in the same collective step; every rank raises the same error."""


def agree(work: Callable[[], T], d: Dist, catch: tuple[type[BaseException], ...]) -> list[T]:
    """Run `work()` on every rank and gather the results; when it raised one of `catch` on any
    rank, every rank raises it (the first rank's, re-raised as its own type when it can be built
    from a message). Without this, one rank leaves for its error path while the others wait for
    it in the next collective until the timeout."""
    try:
        result: Any = ("ok", work())
    except catch as e:
        result = ("error", type(e), str(e), d.rank)
    results = all_gather_object(result)
    for r in results:
        if r[0] == "error":
            _, cls, message, rank = r
            try:
                error = cls(message if rank == d.rank else f"rank {rank}: {message}")
            except TypeError:
                error = RankFailed(f"rank {rank}: {cls.__name__}: {message}")
            raise error
    return [r[1] for r in results]


def interleave(parts: list[list[T]]) -> list[T]:
    """Undo Dist.rows: parts[r] holds rows r, r + W, r + 2W, ... of the global list."""
    out: list = []
    for i in range(max(map(len, parts), default=0)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def gather_rows(local: torch.Tensor, d: Dist) -> torch.Tensor:
    """The global [n, ...] tensor from each rank's Dist.rows(n) slice (equal sizes on all ranks)."""
    if d.world_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(d.world_size)]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, *local.shape[1:])
