"""The trainer's served image (services.trainer.image) on one rank of `torchrun --nproc-per-node N`
(or alone): the image of a checkpoint, then of the same weights nudged, and the delta between
them. Rank 0 writes what it got to OUT/image.pt for test_trainer_image.py.

    python tests/integration/image_worker.py MODEL_DIR OUT
"""
from __future__ import annotations

import pathlib
import sys

import torch
from torch.distributed.tensor import DTensor

from services.trainer import distributed
from services.trainer.image import ServedImage


def main(model_dir: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    d = distributed.init("cpu", "float32")
    model = distributed.load_model(AutoModelForCausalLM, model_dir, d)
    image = ServedImage(model, d, "bfloat16")
    image.snapshot(1)
    first = {name: t for name, t in image.full()}
    digest = image.digest
    with torch.no_grad():  # every weight moved a little: some bf16 bits change, most do not
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).mul_(1.004)
    delta = image.advance(2)
    second = {name: t for name, t in image.full()}
    if d.main:
        torch.save(dict(world_size=d.world_size, first=first, second=second, digest=digest, entries=delta.entries,
                        base_digest=delta.base_digest, image_digest=delta.image_digest, changed=delta.changed,
                        elements=delta.elements, base_version=delta.base_version, version=delta.version),
                   pathlib.Path(out) / "image.pt")
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
