"""Memory and time of a SeLa label step with [3000 x 10] heads on ResNet-50-sized features (D = 2048).

Run: .venv/bin/python bench/label_step.py [--n 100000]

Random features stand in for the backbone pass; each head is solved in turn into one shared bfloat16
kernel, as `labelkit generate` does. Peak memory is features (N x D float32) + kernel (N x K bfloat16) +
small vectors and per-block workspaces; the script measures it at N and extrapolates the parts that grow with N
to ImageNet's 1,281,167.
"""

import argparse
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=3000)
    parser.add_argument("--heads", type=int, default=10)
    args = parser.parse_args()

    from labelkit.solver import kernel_buffer, solve

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    gen = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(args.n, args.dim, generator=gen))
    buffer = kernel_buffer(args.n, args.k)
    t0 = time.perf_counter()
    iterations = 0
    for _h in range(args.heads):
        weight = torch.randn(args.k, args.dim, generator=gen) * (4.0 / args.dim)
        result = solve(features=features, weight=weight, bias=torch.zeros(args.k), buffer=buffer)
        iterations += result.iterations
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 - base
    features_gb = args.n * args.dim * 4 / 1e9
    kernel_gb = args.n * args.k * 2 / 1e9
    scale = 1_281_167 / args.n
    print(f"N={args.n:,} D={args.dim} heads={args.heads} x K={args.k}: {seconds:.1f} s, {iterations} iterations")
    print(f"peak RSS added {peak:.2f} GB (features {features_gb:.2f} GB + kernel {kernel_gb:.2f} GB)")
    fixed = max(0.0, peak - features_gb - kernel_gb)  # workspaces that do not grow with N
    print(f"at N=1,281,167: about {(features_gb + kernel_gb) * scale + fixed:.1f} GB "
          f"(features {features_gb * scale:.1f} GB + kernel {kernel_gb * scale:.1f} GB + {fixed:.1f} GB workspace)")


if __name__ == "__main__":
    main()
