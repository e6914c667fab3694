"""labelkit's Sinkhorn against the paper's loop, in the same process.

Run: .venv/bin/python bench/sinkhorn.py [--n 200000] [--k 3000] [--no-baseline] [--warm] [--dense]
     LABELKIT_PRODUCTS=widen|fused .venv/bin/python bench/sinkhorn.py ...   (force a products path)

Logits come from a random linear head on random D=128 features, scaled so that the softmax maxima average
about 0.3. The baseline is the SeLa paper's loop written out plainly: P^lam in float64, alternating full
matrix-vector products, stopped when the summed relative change of beta falls below 0.1.
"""

import argparse
import os
import resource
import time

import torch


def realistic_features(n: int, k: int, d: int = 128, seed: int = 0, target: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=gen)
    weight = torch.randn(k, d, generator=gen) / d**0.5
    bias = torch.zeros(k)
    probe = features[:2000] @ weight.T
    lo, hi = 0.1, 50.0
    for _ in range(40):  # scale the head so mean max softmax is about `target`
        mid = (lo * hi) ** 0.5
        if torch.softmax(probe * mid, 1).amax(1).mean() < target:
            lo = mid
        else:
            hi = mid
    return features, weight * mid, bias


def paper_loop(logits: torch.Tensor, lam: float = 25.0):
    """SeLa's Sinkhorn as in the paper: float64 P^lam, stop when sum |beta_old / beta_new - 1| < 0.1."""
    p = torch.softmax(logits.double(), dim=1).T.contiguous()  # K x N
    p.pow_(lam)
    k, n = p.shape
    r = torch.full((k,), 1.0 / k, dtype=torch.float64)
    c = torch.full((n,), 1.0 / n, dtype=torch.float64)
    inv_k, inv_n = 1.0 / k, 1.0 / n
    err, iterations = 1e6, 0
    while err > 0.1:
        r = inv_k / (p @ c)
        c_new = inv_n / (r @ p)
        err = float(torch.nansum((c / c_new - 1).abs()))
        c = c_new
        iterations += 1
    p.mul_(c.unsqueeze(0)).mul_(r.unsqueeze(1))
    labels = p.argmax(0)
    return labels.numpy(), iterations


def stream_bandwidth(gb: float = 1.0) -> float:
    a = torch.ones(int(gb * 2**30 / 4))
    a.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        a.sum()
    return 3 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--k", type=int, default=3000)
    parser.add_argument("--lam", type=float, default=25.0)
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--omega", type=float, default=None)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--warm", action="store_true", help="also re-solve after perturbing the head by 1 %")
    parser.add_argument("--features", action="store_true", help="pass features + head instead of logits")
    parser.add_argument("--dense", action="store_true", help="never keep the kernel as sparse rows (sparse=False)")
    args = parser.parse_args()

    from labelkit.solver import Algorithm, Storage, solve

    torch.set_num_threads(os.cpu_count() or 1)
    features, weight, bias = realistic_features(args.n, args.k)
    algorithm = Algorithm(lam=args.lam, **{k: v for k, v in (("tol", args.tol), ("omega", args.omega)) if v is not None})
    kwargs = {"algorithm": algorithm, "storage": Storage(sparse=not args.dense)}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"N={args.n:,} K={args.k} lam={args.lam} threads={torch.get_num_threads()} on {cpu}")
    bandwidth = stream_bandwidth()
    if args.features:
        result = solve(features=features, weight=weight, bias=bias, **kwargs)
        logits = None
    else:
        logits = features @ weight.T + bias
        print(f"mean max softmax: {torch.softmax(logits[:20000], 1).amax(1).mean():.3f}")
        result = solve(logits, **kwargs)
    kernel_gb = args.n * args.k * 2 / 1e9
    per_iter = kernel_gb * 1.0  # one read of the bf16 kernel per iteration
    if result.products == "sparse":  # sparse rows: float32 value + int32 column per non-zero, rows and transpose
        per_iter = args.n * args.k * result.density * 16 / 1e9
    print(f"labelkit: {result.seconds:.2f} s, {result.iterations} iterations, error {result.error:.2e}, "
          f"rebuilds {result.rebuilds}, converged={result.converged}")
    print(f"  products: {result.products} ({result.products_why})")
    print(f"  {per_iter:.2f} GB read per iteration; streaming bandwidth {bandwidth:.1f} GB/s "
          f"-> {per_iter / bandwidth * 1e3:.0f} ms/iteration at best")
    print(f"  cluster sizes {result.sizes.min()}..{result.sizes.max()} (N/K = {args.n / args.k:.1f})")
    print(f"  peak RSS so far {peak_rss_gb():.2f} GB")
    if args.warm:
        gen = torch.Generator().manual_seed(1)
        moved = weight + 0.01 * weight.std() * torch.randn(weight.shape, generator=gen)
        if args.features:
            warm = solve(features=features, weight=moved, bias=bias, warm_start=result, **kwargs)
            cold = None
        else:
            moved_logits = features @ moved.T + bias
            warm = solve(moved_logits, warm_start=result, **kwargs)
            cold = solve(moved_logits, **kwargs)
        print(f"warm re-solve after a 1 % head perturbation: {warm.seconds:.2f} s, {warm.iterations} iterations"
              + (f" (cold: {cold.seconds:.2f} s, {cold.iterations} iterations; labels equal "
                 f"{(cold.labels == warm.labels).mean():.4%})" if cold else ""))
    if args.no_baseline or logits is None:
        return
    t0 = time.perf_counter()
    paper_labels, paper_iters = paper_loop(logits, args.lam)
    paper_s = time.perf_counter() - t0
    agree = (paper_labels == result.labels).mean()
    print(f"paper loop (float64): {paper_s:.2f} s, {paper_iters} iterations")
    print(f"speed-up {paper_s / result.seconds:.1f}x, label agreement {agree:.4%}, peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
