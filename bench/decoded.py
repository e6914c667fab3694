"""Training throughput: images decoded once and augmented by the batch, against the per-sample loader path, in
one process on this machine (issue 32).

    .venv/bin/python bench/decoded.py [--data SPEC] [--image-size 16] [--augment digits] [--epochs 2]

Each path trains the same model (the auto recipe's ``labelkit_cnn`` with three heads of K = 10) on the same
samples in the same order with the same batch: the per-sample path as runs read data before (DataLoader, a
decode and PIL augmentation per sample, ``--workers`` processes, 0 by default as the auto recipe uses for
small images) with the contiguous layout runs used before and with channels_last, and the decoded path with
channels_last in float32 (as runs train now) and in bfloat16 (``--precision bfloat16``, faster where the CPU
multiplies bfloat16 in hardware). Prints images per second of each, the ratios, and the CPU with its bfloat16.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def _epochs(source, transform, model, optimizer, epochs: int, batch: int, workers: int, layout,
            precision: str) -> float:
    from labelkit.data import Order, make_loader
    from labelkit.training import autocast

    images, began = 0, time.perf_counter()
    for epoch in range(epochs):
        for indices, x, _bad in make_loader(source, transform, Order(batch, shuffle=True, seed=0, epoch=epoch),
                                            workers=workers):
            x = x.contiguous(memory_format=layout)
            with autocast(torch.device("cpu"), precision):
                loss = sum(torch.nn.functional.cross_entropy(out.float(), indices % 10) for out in model(x))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images += len(indices)
    return images / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--augment", default="digits")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()

    from labelkit.data import augmentation_preset, keep_decoded, resolve
    from labelkit.training import SelaModel, create_backbone, native_bfloat16

    transform = augmentation_preset(args.augment, args.image_size)
    rates = {}
    native = native_bfloat16()  # what a bfloat16 path costs depends on it
    paths = (("per-sample, contiguous (before)", False, torch.contiguous_format, "float32"),
             ("per-sample, channels_last", False, torch.channels_last, "float32"),
             ("decoded, channels_last (now)", True, torch.channels_last, "float32"),
             ("decoded, --precision bfloat16" + ("" if native else " (emulated)"), True, torch.channels_last,
              "bfloat16"))
    for name, decoded, layout, precision in paths:
        torch.manual_seed(0)
        model = SelaModel(create_backbone("labelkit_cnn", args.image_size), [10, 10, 10]).to(memory_format=layout)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        source = resolve(args.data)
        decode = 0.0
        if decoded:
            began = time.perf_counter()
            keep_decoded(source, args.image_size, budget=1 << 34)
            decode = time.perf_counter() - began
        rates[name] = _epochs(source, transform, model, optimizer, args.epochs, args.batch_size, args.workers, layout,
                              precision)
        print(f"{name:>32}: {rates[name]:7.0f} img/s training" + (f" (decoded once in {decode:.1f} s)" if decode else ""))
    before, now, bf16 = rates[paths[0][0]], rates[paths[2][0]], rates[paths[3][0]]
    print(f"ratio now / before: {now / before:.2f}x; decoded / per-sample, both channels_last: "
          f"{now / rates[paths[1][0]]:.2f}x; --precision bfloat16 / before: {bf16 / before:.2f}x, / now: "
          f"{bf16 / now:.2f}x  ({args.data}, {len(source):,} samples, {args.image_size} px, "
          f"augment {args.augment}, batch {args.batch_size}, {torch.get_num_threads()} threads, {_cpu()}, "
          f"{'native' if native else 'no native'} bfloat16)")


if __name__ == "__main__":
    main()
