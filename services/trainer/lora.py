"""Low-rank adapters (LoRA, Hu et al. 2021) on the trainer's models, with peft.

A targeted weight W [out, in] stays frozen; the model learns W' = W + (alpha / r) B A with
A [r, in] and B [out, r] (B starts at zero, so training starts from the base model). What this
buys a PPO run:

- the trainer holds one copy of the base: the policy is base + adapter, and the reference (the
  SFT policy) is the same base with the adapter switched off (`disabled`), not a second model;
- gradients and AdamW moments exist for the adapter only (a few MB where the model is GBs);
- a checkpoint is the adapter and its optimizer state, not the model.

The base is stored in the compute dtype (bf16 on GPUs: it is never updated, so it needs no fp32
master copy); the adapter and any module trained in full (the value model's score head) stay
fp32, as FSDP2 wants the trained parameters of a unit in one dtype.

Until the policy service takes adapters, the policy replicas get W' itself (`lora.push: merged`):
`served_tensors` gives each rank its rows of W' under the full model's names, which the
trainer's served image (services.trainer.image) compares and pushes as a delta like any other
weights; `merged_parameters` gathers W' whole, one weight at a time, for --export-merged.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Callable, Iterator

import torch
from torch.distributed.tensor import DTensor

from services.trainer.config import ConfigError, LoRA

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name for the one adapter a model carries here (lora.name is the policy service's)
ADAPTER_DIR = "adapter"  # a checkpoint's peft-format copy of the policy's adapter


HEADS = ("lm_head", "score", "classifier")  # output layers: trained in full (a score head) or not at all


def target_modules(model: torch.nn.Module, settings: LoRA) -> list[str]:
    """The names (last components) of the layers to adapt. "all-linear": every linear layer but
    the output head, e.g. q_proj k_proj v_proj o_proj gate_proj up_proj down_proj on Llama and
    Qwen2. Adapting all of them is QLoRA's finding (Dettmers et al. 2023: attention-only LoRA, the
    original paper's and peft's per-architecture default, falls short of full fine-tuning). Short
    names, not paths, so that the saved adapter_config.json reads as vLLM and peft users expect."""
    from transformers.pytorch_utils import Conv1D

    if settings.target_modules != "all-linear":
        return list(settings.target_modules)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head and name.rsplit(".", 1)[-1] not in HEADS}
    if not names:
        raise ConfigError(f"lora.target_modules: {type(model).__name__} has no linear layer besides its head")
    return sorted(names)


def peft_config(model: torch.nn.Module, settings: LoRA, task: str):
    """peft's LoraConfig for our settings. task: "causal_lm" (the policy) or "seq_cls" (the reward
    and value models: peft then trains their score head in full, as modules_to_save)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=target_modules(model, settings), bias="none",
                      task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS)


def wrap(model: torch.nn.Module, settings: LoRA, task: str, *, seed: int, on_meta: bool = False) -> torch.nn.Module:
    """`model` (frozen) with a new adapter: only the adapter's parameters (and a score head's
    trained copy) require grad, in fp32. A and B are drawn from `seed`, whatever ran before, so
    that every world size starts from the same adapter. on_meta: the model's parameters are on the
    meta device (a rank that receives its shards from rank 0); the adapter is made there too."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear, LoraLayer

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, peft_config(model, settings, task), adapter_name=ADAPTER,
                                     autocast_adapter_dtype=True, low_cpu_mem_usage=on_meta)
        except ValueError as e:  # peft's "Target modules {...} not found in the base model"
            raise ConfigError(f"lora.target_modules: {e}") from None
    # The merged weights (merged_parameters) are W + scaled B A of linear layers; an adapted
    # embedding or convolution would need their own rules.
    other = sorted({type(m).__name__ for m in wrapped.modules() if isinstance(m, LoraLayer) and not isinstance(m, Linear)})
    if other:
        raise ConfigError(f"lora.target_modules: only linear layers can be adapted here, not {', '.join(other)}")
    for p in wrapped.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # a score head copied from a bf16 base: fp32 master weights
    return wrapped


def check_not_adapter(path, key: str) -> None:
    """A job starts from a whole model: name the fix when `path` holds an adapter instead."""
    path = pathlib.Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {path} holds a LoRA adapter, not a model; write base + adapter merged with "
                          f"--export-merged DIR where it was trained, and start from DIR")


def is_lora(model: torch.nn.Module | None) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a peft wrapper (its targeted layers hold the adapter), or
    `model` itself. Sharding, the value head and the exports work on this one."""
    return model.get_base_model() if is_lora(model) else model


@contextlib.contextmanager
def disabled(model: torch.nn.Module):
    """The base model for the with block: every adapter layer computes W x alone (the reference
    of a LoRA run), and a score head trained in full falls back to its original."""
    with model.disable_adapter():
        yield model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What an optimizer steps: every parameter of a whole model, the adapter of a LoRA one."""
    return [p for p in model.parameters() if p.requires_grad]


# ---- the merged weights -------------------------------------------------------------------

def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def _plan(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """(name in the full model, parameter name in the wrapped one, what it is) in parameter order:
    "merged" a targeted weight (W + scaled B A), "copy" anything else the full model has, "trained"
    a module trained in full (its trained copy under the original's name). The adapter's own
    parameters and the originals of such modules are left out: they are folded in or replaced."""
    plan = []
    for name, _ in base_of(model).named_parameters():
        parts = name.split(".")
        if "lora_A" in parts or "lora_B" in parts or "original_module" in parts:
            continue
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            plan.append((".".join(parts[:i] + parts[i + 2:]), name, "trained"))
        elif "base_layer" in parts:
            full_name = ".".join(p for p in parts if p != "base_layer")
            plan.append((full_name, name, "merged" if parts[-1] == "weight" else "copy"))
        else:
            plan.append((name, name, "copy"))
    return plan


def merged_parameters(model: torch.nn.Module, d, dtype: torch.dtype | None = None
                      ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, tensor on rank 0's CPU | None elsewhere) of the merged model W' = W + (alpha / r) B A,
    one parameter at a time, under the names of the model without adapters (what the policy
    server and a Hugging Face checkpoint use; a tied embedding once).

    Each targeted weight is gathered with its A and B (all ranks: every gather is a collective),
    merged on the device in fp32 and rounded once, to `dtype` when given (the served dtype),
    else left fp32; other parameters come as stored (or in `dtype`). Nothing but the parameter at
    hand is ever whole.
    """
    inner = base_of(model)
    params = dict(inner.named_parameters())
    for full_name, name, kind in _plan(model):
        tensor = _full(params[name])
        if kind == "merged":
            layer = inner.get_submodule(name.rsplit(".", 2)[0])  # <layer>.base_layer.weight
            a, b = _full(layer.lora_A[ADAPTER].weight).float(), _full(layer.lora_B[ADAPTER].weight).float()
            delta = (b @ a) * layer.scaling[ADAPTER]
            tensor = tensor.float() + (delta.T if layer.fan_in_fan_out else delta)
        if dtype is not None:
            tensor = tensor.to(dtype)
        yield full_name, (tensor.to("cpu") if d.main else None)
        del tensor


def served_tensors(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(name in the full model, global shape, a function giving this rank's rows of W') for every
    tensor merged_parameters yields, in its order: what the trainer's served image
    (services.trainer.image) takes from a LoRA policy, without gathering any weight whole.

    FSDP2 shards W [out, in] and B [out, r] by rows alike, so this rank's rows of
    W' = W + (alpha / r) B A are its rows of W plus its rows of B times the whole of A (gathered:
    r x in, small). Parameters that are not merged come as they are (DTensor or local). Every
    rank must call the functions in the same order: gathering A is a collective. A Conv1D-style
    layer (fan_in_fan_out: W stored [in, out]) is merged whole; the image keeps this rank's rows."""
    inner = base_of(model)
    params = dict(inner.named_parameters())
    out = []
    for full_name, name, kind in _plan(model):
        p = params[name]
        if kind != "merged":
            out.append((full_name, tuple(p.shape), lambda p=p: p))
            continue
        layer = inner.get_submodule(name.rsplit(".", 2)[0])  # <layer>.base_layer.weight
        out.append((full_name, tuple(p.shape), lambda p=p, layer=layer: _merged_rows(p, layer)))
    return out


def _merged_rows(w: torch.Tensor, layer) -> torch.Tensor:
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    scaling = layer.scaling[ADAPTER]
    if layer.fan_in_fan_out:  # W [in, out]: merged whole; the image keeps this rank's rows
        return _full(w).float() + ((_full(b).float() @ _full(a).float()) * scaling).T
    local_w = w.to_local() if isinstance(w, DTensor) else w.detach()
    local_b = b.to_local() if isinstance(b, DTensor) else b.detach()
    return local_w.float() + (local_b.float() @ _full(a).float()) * scaling


def adapter_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the adapter's parameters (A, B and any module trained in full) in `dtype`: what an
    adapter-only push would move."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * size for p in trainable(model))


# ---- the merged model, written out --------------------------------------------------------

def export_merged(model: torch.nn.Module, out: pathlib.Path, d, tokenizer=None) -> None:
    """A plain Hugging Face directory of base + adapter merged (config, safetensors, tokenizer),
    servable without LoRA support. The same tensors as a merged push, in the compute dtype (the
    dtype the frozen base is stored in). Every rank calls this; rank 0 writes."""
    from safetensors.torch import save_file

    inner = base_of(model)
    dtype = next(p.dtype for p in inner.parameters() if not p.requires_grad)
    state = {name: t for name, t in merged_parameters(model, d, dtype)}
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        config = inner.config.to_dict() | {"dtype": str(dtype).removeprefix("torch.")}
        type(inner.config).from_dict(config).save_pretrained(out)
        if getattr(inner, "generation_config", None) is not None and inner.can_generate():
            inner.generation_config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        log.info("merged model written to %s", out)
    del state
    torch.distributed.barrier()
