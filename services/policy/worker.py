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
    linear layers), which plain `param.copy_` would bypass. A tied lm_head shares the
    embedding parameter but has its own processed copy on CPU, so after loading the
    embedding we re-process lm_head from it."""

    def rlhf_reload(self, sources: list[tuple]) -> int:
        import torch

        model = self.model_runner.get_model()
        tensors = _read_sources(sources, torch)
        self.model_runner.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is not None and embed is not None and getattr(lm_head, "weight", None) is getattr(embed, "weight", None):
            method = getattr(lm_head, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(lm_head)
        return len(sources)


def _read_sources(sources, torch):
    """(name, tensor) for each source row (weights.TensorSource as a tuple). A pushed
    tensor is read into a fresh tensor of its own (no mmap): the staged file stays out of
    this process's RSS and each tensor is freed once vLLM has copied it into the model."""
    from safetensors import safe_open

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    files: dict[str, object] = {}
    try:
        for name, kind, path, offset, dtype, shape in sources:
            if kind == "raw":
                if path not in files:
                    files[path] = open(path, "rb", buffering=0)
                t = torch.empty(shape, dtype=dtypes[dtype])
                f = files[path]
                f.seek(offset)
                f.readinto(t.view(-1).view(torch.uint8).numpy())
                yield name, t
            else:
                if path not in files:
                    files[path] = safe_open(path, framework="pt")
                yield name, files[path].get_tensor(name)
    finally:
        for f in files.values():
            if hasattr(f, "close"):
                f.close()


_limit_worker_spin()  # in vLLM's worker process, which imports this module for WeightLoader
