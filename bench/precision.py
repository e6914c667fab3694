"""bfloat16 against float32 forward passes on this CPU, per model: what ``--precision auto`` gains (or would lose).

    .venv/bin/python bench/precision.py [--steps 15]

For each model, the same network from the same seed takes training steps (forward, backward, SGD; channels_last
as runs train) and inference passes on random tensors under float32 and under bfloat16 autocast, one after the
other in this process. Prints images per second of each, the ratios, the CPU and whether it has native
bfloat16 (``labelkit.training.native_bfloat16``: where it has not, ``auto`` keeps float32).
"""

from __future__ import annotations

import argparse
import time

import torch

MODELS = (("labelkit_cnn", 16, 128), ("labelkit_cnn", 28, 128), ("resnet18", 96, 64), ("alexnet_small", 32, 128),
          ("alexnet", 64, 64))


def _rate(arch: str, size: int, batch: int, precision: str, train: bool, steps: int) -> float:
    from labelkit.training import SelaModel, autocast, create_backbone, model_to, train_step

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = model_to(SelaModel(create_backbone(arch, size), [10, 10, 10]), cpu).train(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.rand(batch, 3, size, size), torch.randint(0, 10, (3, batch))
    for step in range(steps + 3):  # three untimed steps: oneDNN picks and caches its kernels
        if step == 3:
            began = time.perf_counter()
        if train:
            train_step(model, optimizer, images, labels, cpu, precision)
        else:
            with torch.no_grad(), autocast(cpu, precision):
                model.features(images.contiguous(memory_format=torch.channels_last))
    return batch * steps / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()

    from decoded import _cpu
    from labelkit.training import native_bfloat16

    print(f"{_cpu()}, {torch.get_num_threads()} threads, native bfloat16: {native_bfloat16()}")
    for arch, size, batch in MODELS:
        for train in (True, False):
            f32 = _rate(arch, size, batch, "float32", train, args.steps)
            bf16 = _rate(arch, size, batch, "bfloat16", train, args.steps)
            print(f"{arch:>14} {size:3d} px batch {batch:3d} {'training' if train else 'inference':>9}: "
                  f"float32 {f32:7.0f} img/s, bfloat16 {bf16:7.0f} img/s, ratio {bf16 / f32:.2f}x", flush=True)


if __name__ == "__main__":
    main()
