"""What runs inside vLLM's worker process: the weight loader (a worker extension, as in
vLLM's own RLHF examples) and a patch of the worker's idle spin on CPU.

vLLM imports this module in its worker process (the engine names WeightLoader in
`worker_extension_cls`); the server process never needs to.
"""
from __future__ import annotations

import os

# vLLM's worker busy-polls its shared-memory queue (sched_yield) for a second after each
# step before it sleeps (SpinCondition.busy_loop_s in vllm's shm_broadcast). On a CPU node
# that second takes a core from whatever runs next: right after a Generate, a reward-model
# forward on the same 2-core machine ran ~25x slower. On CPU the engine sets this variable
# for its worker process, where importing this module applies it (see the end of the
# file); 10 ms still covers the gap between two decode steps.
WORKER_SPIN_ENV = "RLHF_VLLM_WORKER_SPIN_S"
CPU_WORKER_SPIN_S = 0.01


def _limit_worker_spin() -> None:
    limit = os.environ.get(WORKER_SPIN_ENV)
    if limit is None:
        return
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:  # a vLLM without it: nothing to limit
        return
    wait = SpinCondition.wait

    def limited_wait(self, timeout_ms=None):
        self.busy_loop_s = min(self.busy_loop_s, float(limit))
        return wait(self, timeout_ms)

    SpinCondition.wait = limited_wait


class WeightLoader:
    """vLLM worker extension (runs in the engine-core process, next to the model).

    vLLM's in-place reload re-runs the CPU/GPU weight processing (e.g. oneDNN packing of
    linear layers), which plain `param.copy_` would bypass. It loads layer by layer: a layer
    is re-processed once all its parameters arrived, and a layer that gets none keeps its
    processed tensors as they are. So a partial reload must bring every checkpoint tensor of
    each layer it touches: q, k and v (and their biases) for a fused qkv_proj, gate and up
    for gate_up_proj (the model's packed_modules_mapping says which). A tied lm_head shares
    the embedding parameter but has its own processed copy on CPU, so after loading the
    embedding we re-process lm_head from it."""

    def rlhf_reload(self, sources: list[tuple], touched: list[str] | None = None) -> int:
        """Reload the tensors `touched` names (None: all) and the rest of their layers, from
        `sources` (weights.TensorSource rows of every served tensor); the tensors read."""
        import logging

        model = self.model_runner.get_model()
        if touched is not None:
            sources = layer_closure(sources, touched, getattr(model, "packed_modules_mapping", None) or {})
        names = {row[0] for row in sources}
        # A partial reload leaves most layers alone on purpose; vLLM warns about each (and
        # lists every parameter not loaded). Those warnings say nothing here.
        quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
        levels = [q.level for q in quiet]
        if touched is not None:
            for q in quiet:
                q.setLevel(logging.ERROR)
        try:
            self.model_runner.reload_weights(weights_iterator=_read_sources(sources), is_checkpoint_format=True)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        tied = (lm_head is not None and embed is not None
                and getattr(lm_head, "weight", None) is getattr(embed, "weight", None))
        if tied and any(name.endswith("embed_tokens.weight") for name in names):
            method = getattr(lm_head, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(lm_head)
        return len(sources)


def layer_of(name: str, fused: dict[str, str]) -> str:
    """The vLLM module a checkpoint tensor loads into: its module path, a fused part
    (q_proj, gate_proj, ...) replaced by the fused layer (qkv_proj, gate_up_proj, ...)."""
    return ".".join(fused.get(part, part) for part in name.split(".")[:-1])


def layer_closure(sources: list[tuple], touched: list[str], packed: dict[str, list[str]]) -> list[tuple]:
    """The rows of `sources` that a reload of `touched` needs: every tensor of each layer a
    touched tensor loads into."""
    fused = {part: layer for layer, parts in packed.items() for part in parts}
    layers = {layer_of(name, fused) for name in touched}
    return [row for row in sources if layer_of(row[0], fused) in layers]


def read_tensor(kind: str, path: str, offset: int, dtype: str, shape, name: str, to_dtype: str | None = None,
                files: dict | None = None):
    """One tensor of a source row (weights.TensorSource), in `to_dtype` when given. A pushed
    tensor is read into a fresh tensor of its own (no mmap): the staged file stays out of
    this process's RSS. `files` keeps files open across calls (the caller closes them)."""
    import torch

    own = files is None
    files = {} if own else files
    try:
        if kind == "raw":
            if path not in files:
                files[path] = open(path, "rb", buffering=0)
            t = torch.empty(tuple(shape), dtype=getattr(torch, dtype))
            f = files[path]
            f.seek(offset)
            view, done = memoryview(t.reshape(-1).view(torch.uint8).numpy()), 0
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"tensor {name!r}: {path} ends {len(view) - done} bytes early")
                done += n
        elif kind == "safetensors":
            from safetensors import safe_open

            if path not in files:
                files[path] = safe_open(path, framework="pt")
            t = files[path].get_tensor(name)
        else:
            raise ValueError(f"tensor {name!r}: a source of kind {kind!r} cannot be read as a tensor")
    finally:
        if own:
            _close(files)
    return t.to(getattr(torch, to_dtype)) if to_dtype else t


def _close(files: dict) -> None:
    for f in files.values():
        if hasattr(f, "close"):
            f.close()


def _read_sources(sources):
    """(name, tensor) for each source row; each tensor is freed once vLLM has copied it into
    the model."""
    files: dict = {}
    try:
        for name, kind, path, offset, dtype, shape in sources:
            yield name, read_tensor(kind, path, offset, dtype, shape, name, files=files)
    finally:
        _close(files)


_limit_worker_spin()  # in vLLM's worker process, which imports this module for WeightLoader
