"""NMI, ARI and AMI at ImageNet size: labelkit against scikit-learn, in the same process.

Run: .venv/bin/python bench/metrics.py [--n 1281167] [--clusters 3000] [--classes 1000] [--no-sklearn-ami]

The case: 1,000 classes with ImageNet-like sizes (732-1,300 images), and 3,000 near-equal clusters that
follow the classes for 60 % of the samples, as self-labels do. scikit-learn's AMI alone takes minutes here.
"""

import argparse
import time

import numpy as np


def make_case(n: int, clusters: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = np.where(rng.random(classes) < 0.9, 1300, rng.integers(732, 1300, classes)).astype(np.float64)
    truth = rng.choice(classes, size=n, p=sizes / sizes.sum())
    follow = rng.random(n) < 0.6
    per_class = clusters // classes
    pred = np.where(follow, truth * per_class + rng.integers(0, per_class, n), rng.integers(0, clusters, n))
    return pred.astype(np.int64), truth.astype(np.int64)


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--clusters", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--no-sklearn-ami", action="store_true", help="skip scikit-learn's AMI (minutes)")
    args = parser.parse_args()

    from sklearn import metrics as sk

    from labelkit.quality import _metrics as lk

    pred, truth = make_case(args.n, args.clusters, args.classes)
    print(f"N={args.n:,} clusters={args.clusters} classes={args.classes}")

    def labelkit_all():
        table = lk.contingency(pred, truth)
        return lk.nmi(table), lk.ari(table), lk.ami(table)

    (l_nmi, l_ari, l_ami), l_total = timed(labelkit_all)
    s_nmi, t_nmi = timed(lambda: sk.normalized_mutual_info_score(truth, pred))
    s_ari, t_ari = timed(lambda: sk.adjusted_rand_score(truth, pred))
    print(f"{'metric':<8}{'labelkit':>14}{'scikit-learn':>16}{'|diff|':>10}{'sklearn s':>11}")
    print(f"{'NMI':<8}{l_nmi:>14.10f}{s_nmi:>16.10f}{abs(l_nmi - s_nmi):>10.1e}{t_nmi:>11.2f}")
    print(f"{'ARI':<8}{l_ari:>14.10f}{s_ari:>16.10f}{abs(l_ari - s_ari):>10.1e}{t_ari:>11.2f}")
    sk_total = t_nmi + t_ari
    if not args.no_sklearn_ami:
        s_ami, t_ami = timed(lambda: sk.adjusted_mutual_info_score(truth, pred))
        print(f"{'AMI':<8}{l_ami:>14.10f}{s_ami:>16.10f}{abs(l_ami - s_ami):>10.1e}{t_ami:>11.2f}")
        sk_total += t_ami
    else:
        print(f"{'AMI':<8}{l_ami:>14.10f}{'(skipped)':>16}")
    print(f"labelkit NMI+ARI+AMI: {l_total:.2f} s   scikit-learn: {sk_total:.2f} s   ratio: {sk_total / l_total:.0f}x")
    _, t_full = timed(lambda: lk.compare(pred, truth, k=args.clusters))
    print(f"labelkit full report for one head (all metrics, Hungarian skipped as K != classes): {t_full:.2f} s")


if __name__ == "__main__":
    main()
