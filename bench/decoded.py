"""Training throughput: images decoded once and augmented by the batch, against the per-sample loader path, in
one process on this machine (issue 32).

    .venv/bin/python bench/decoded.py [--data SPEC] [--image-size 16] [--augment digits] [--rounds 4]

Each path trains the same model (the auto recipe's ``labelkit_cnn`` with three heads of K = 10) on the same
samples in the same order with the same batch: the per-sample path as runs read data before (DataLoader, a
decode and PIL augmentation per sample, ``--workers`` processes, 0 by default as the auto recipe uses for
small images) with the contiguous layout runs used before and with channels_last, and the decoded path with
channels_last in float32 (as runs train now) and in bfloat16 (``--precision bfloat16``, faster where the CPU
multiplies bfloat16 in hardware).

The paths take turns, an epoch each, for ``--rounds`` rounds (the order rotated every round): a virtual
machine's speed wanders by tens of per cent within minutes, and paths timed one after the other would carry
that drift into their ratio. Prints each path's images per second over all its epochs, the ratios with the
range of the per-round ratios, the arithmetic rate each path reaches (floating-point operations of one
training step, counted by torch's FlopCounterMode, times its images per second: the rate a faster loader
cannot lift), and the CPU with its bfloat16.
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


def _epoch(path: dict, epoch: int, batch: int, workers: int) -> tuple[int, float]:
    """One epoch of ``path``: (images, seconds)."""
    from labelkit.data import Order, make_loader
    from labelkit.training import autocast

    model, optimizer, layout = path["model"], path["optimizer"], path["layout"]
    images, began = 0, time.perf_counter()
    for indices, x, _bad in make_loader(path["source"], path["transform"],
                                        Order(batch, shuffle=True, seed=0, epoch=epoch), workers=workers):
        x = x.contiguous(memory_format=layout)
        with autocast(torch.device("cpu"), path["precision"]):
            loss = sum(torch.nn.functional.cross_entropy(out.float(), indices % 10) for out in model(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += len(indices)
    return images, time.perf_counter() - began


def _flops_per_image(model, image_size: int, batch: int) -> float:
    """Floating-point operations of one training step (forward, backward; the SGD update is not counted) per
    image, on a copy of ``model``."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model)
    x = torch.zeros(batch, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        sum(torch.nn.functional.cross_entropy(out, torch.zeros(batch, dtype=torch.long)) for out in model(x)).backward()
    return counter.get_total_flops() / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--augment", default="digits")
    parser.add_argument("--rounds", type=int, default=4, help="epochs of each path, taken in turns")
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
    runs = []
    for name, decoded, layout, precision in paths:
        torch.manual_seed(0)
        model = SelaModel(create_backbone("labelkit_cnn", args.image_size), [10, 10, 10]).to(memory_format=layout)
        source = resolve(args.data)
        decode = 0.0
        if decoded:
            began = time.perf_counter()
            keep_decoded(source, args.image_size, budget=1 << 34)
            decode = time.perf_counter() - began
        runs.append(dict(name=name, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                         layout=layout, precision=precision, source=source, transform=transform, decode=decode,
                         images=[], seconds=[]))
    for path in runs:  # a first epoch each, untimed: allocator, oneDNN primitives, page cache
        _epoch(path, args.rounds, args.batch_size, args.workers)
    for r in range(args.rounds):
        for path in runs[r % len(runs):] + runs[:r % len(runs)]:
            images, seconds = _epoch(path, r, args.batch_size, args.workers)
            path["images"].append(images)
            path["seconds"].append(seconds)
    flops = _flops_per_image(runs[0]["model"], args.image_size, args.batch_size)
    for path in runs:
        rates[path["name"]] = sum(path["images"]) / sum(path["seconds"])
        decode = f" (decoded once in {path['decode']:.1f} s)" if path["decode"] else ""
        print(f"{path['name']:>32}: {rates[path['name']]:7.0f} img/s training, "
              f"{rates[path['name']] * flops / 1e9:4.0f} GFLOP/s{decode}")

    def ratio(i: int, j: int) -> str:
        per_round = [(runs[i]["images"][r] / runs[i]["seconds"][r]) / (runs[j]["images"][r] / runs[j]["seconds"][r])
                     for r in range(args.rounds)]
        whole = rates[runs[i]["name"]] / rates[runs[j]["name"]]
        return f"{whole:.2f}x (rounds {min(per_round):.2f}-{max(per_round):.2f})"

    print(f"ratio now / before: {ratio(2, 0)}; decoded / per-sample, both channels_last: {ratio(2, 1)}; "
          f"--precision bfloat16 / before: {ratio(3, 0)}, / now: {ratio(3, 2)}")
    print(f"({args.data}, {len(runs[0]['source']):,} samples, {args.image_size} px, augment {args.augment}, batch "
          f"{args.batch_size}, {args.rounds} rounds, {flops / 1e6:.1f} MFLOP a training step per image, {torch.get_num_threads()} threads, {_cpu()}, "
          f"{'native' if native else 'no native'} bfloat16)")


if __name__ == "__main__":
    main()
