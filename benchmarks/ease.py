"""Benchmark: the EASE fit (`udfs.ease`) at several catalogue sizes, and EASE vs ALS candidate scoring.

Synthetic interactions (seed --seed): users = --users-per-item x items, each holding about
--items-per-user items drawn with a Zipf-like popularity, binary values. Per size, in this one
process (no Spark: the driver-side part of `pipelines.core.ease.fit` is what is timed):
- gram: XᵀX with scipy.sparse (for information; the product computes it in Spark),
- fit: `udfs.ease.fit_ease(overwrite_gram=True)`, the inverse and B, three ways: numpy's general inverse in
  float64 (the baseline), the driver's Cholesky (`pipelines.core.ease.spd_inverse`) in float64 and in float32
  (`train.ease.precision`), with how far float32's B and its pruned neighbours are from float64's,
- prune: `udfs.ease.prune_top_n` to --top-n neighbours per item,
- peak RSS: the process's high-water mark during the fit (reset through /proc/self/clear_refs),
  beside `udfs.ease.dense_peak_bytes`, the estimate the pipeline logs.
The machine's float64 GEMM speed is measured once (an --flops-size square matrix product), and each
fit is compared with n³/3 flops at that speed (a Cholesky's count; np.linalg.inv runs LAPACK gesv on
the identity, LU plus n right-hand sides, about 8n³/3 flops, so about 8x is the BLAS-bound floor of
that ratio; a Cholesky inverse, potrf + potri, would need about n³).
At --candidates-size items it also times top-K candidates for all its users, their own items
excluded: `udfs.ease.top_n_sparse` on the pruned model vs ALS-style `udfs.topk.top_n_dot` on random
rank --rank factors, same users, same K. A size is skipped when its dense matrices would not fit in
the available memory, or when its three fits are predicted (n³ from the previous size) to take longer than
--max-fit-seconds.

    .venv/bin/python -u -m benchmarks.ease --sizes 1000 5000 20000
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import psutil
import scipy.sparse as sp

from benchmarks._common import blas_threads, seconds, timed
from pipelines.core.ease import spd_inverse
from udfs.ease import dense_peak_bytes, ease_csr, fit_ease, prune_top_n, top_n_sparse
from udfs.topk import top_n_dot

GB = 1e9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="catalogue sizes (items)")
    p.add_argument("--items-per-user", type=int, default=50)
    p.add_argument("--users-per-item", type=float, default=2.0)
    p.add_argument("--lam", type=float, default=200.0, help="EASE L2 penalty")
    p.add_argument("--top-n", type=int, default=100, help="neighbours kept per item")
    p.add_argument("--k", type=int, default=100, help="candidates per user")
    p.add_argument("--rank", type=int, default=64, help="ALS-style factor rank")
    p.add_argument("--candidates-size", type=int, default=5000, help="size at which candidates are compared")
    p.add_argument("--flops-size", type=int, default=3000, help="matrix size of the GFLOP/s measurement")
    p.add_argument("--max-fit-seconds", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def gflops(size: int, rng: np.random.Generator) -> float:
    """Best of three float64 (size x size) @ (size x size) products, in GFLOP/s (2 size³ flops each)."""
    a, b = rng.random((size, size)), rng.random((size, size))
    a @ b  # warm-up: thread pool start
    best = min(timed(lambda: a @ b) for _ in range(3))
    return 2 * size**3 / best / GB


def interactions(n_items: int, n_users: int, per_user: int, rng: np.random.Generator) -> sp.csr_matrix:
    """(users, items) binary CSR, about `per_user` items per user, Zipf-like item popularity."""
    popularity = 1.0 / (np.arange(n_items) + 10.0) ** 0.8
    items = rng.choice(n_items, size=n_users * per_user, p=popularity / popularity.sum())
    users = np.repeat(np.arange(n_users), per_user)
    x = sp.csr_matrix((np.ones(items.size), (users, items)), shape=(n_users, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def rss_peak_reset() -> bool:
    """Reset this process's RSS high-water mark (Linux); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak() -> int:
    """This process's RSS high-water mark in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


FITS = (  # (name, inverse, dtype): numpy's general inverse is the baseline; the pipeline runs the Cholesky
    ("numpy inv float64", np.linalg.inv, np.float64),
    ("cholesky float64", spd_inverse, np.float64),
    ("cholesky float32", spd_inverse, np.float32),  # train.ease.precision's default
)


def one_fit(gram: np.ndarray, args: argparse.Namespace, inverse: Any, dtype: Any) -> tuple[float, np.ndarray, int]:
    """(seconds, B, peak RSS bytes or 0) of `fit_ease` on a copy of `gram` in `dtype`."""
    work = gram.astype(dtype)
    can_peak = rss_peak_reset()
    started = time.perf_counter()
    b = fit_ease(work, args.lam, overwrite_gram=True, inverse=inverse, dtype=dtype)
    elapsed = time.perf_counter() - started
    return elapsed, b, rss_peak() if can_peak else 0


def fit_size(n: int, x: sp.csr_matrix, args: argparse.Namespace, speed: float) -> tuple[float, np.ndarray]:
    """Time gram, the three fits of FITS and prune at one size, one line each, and how far float32's B and pruned
    neighbours are from float64's; returns (the three fits' seconds, float32's B)."""
    started = time.perf_counter()
    gram = np.asarray((x.T @ x).toarray(), dtype=np.float64)
    t_gram = time.perf_counter() - started
    ids = np.arange(n, dtype=np.int64)
    print(f"{n:>6} items x {x.shape[0]:>6} users ({x.nnz / x.shape[0]:.1f} items/user) | gram {seconds(t_gram)}")
    ideal, results = n**3 / 3 / (speed * GB), {}
    for name, inverse, dtype in FITS:
        t_fit, b, peak = one_fit(gram, args, inverse, dtype)
        results[name] = (t_fit, b)
        itemsize = np.dtype(dtype).itemsize
        print(
            f"  fit {name:<18} {seconds(t_fit)} ({results[FITS[0][0]][0] / t_fit:.2f}x numpy's) | "
            f"peak RSS {peak / GB:.2f} GB, estimate {dense_peak_bytes(n, itemsize) / GB:.2f} GB | "
            f"fit / (n³/3 at {speed:.1f} GFLOP/s) = {t_fit / ideal:.1f}",
            flush=True,
        )
    del gram
    b64, b32 = results["cholesky float64"][1], results["cholesky float32"][1]
    t_prune = timed(lambda: prune_top_n(b32, ids, args.top_n))
    kept64, kept32 = (set(zip(*prune_top_n(b, ids, args.top_n)[:2], strict=True)) for b in (b64, b32))
    print(
        f"  prune top-{args.top_n} {seconds(t_prune)} | float32 vs float64: max |B diff| "
        f"{np.abs(b32 - b64).max():.2e} (max |B| {np.abs(b64).max():.2e}), pruned pairs in common "
        f"{len(kept64 & kept32) / max(len(kept64), 1):.2%}",
        flush=True,
    )
    return sum(t for t, _ in results.values()), b32


def compare_candidates(b: np.ndarray, x: sp.csr_matrix, args: argparse.Namespace, rng: np.random.Generator) -> None:
    """EASE vs ALS-style top-K for the same users, their own items excluded; prints one line."""
    n = b.shape[0]
    ids = np.arange(n, dtype=np.int64)
    nb_indptr, nb_cols, nb_weights = ease_csr(*prune_top_n(b, ids, args.top_n)[:3], ids)
    indptr, items = x.indptr.astype(np.int64), x.indices.astype(np.int64)
    values = x.data.astype(np.float64)
    user_f = rng.normal(size=(x.shape[0], args.rank)).astype(np.float32)
    item_f = rng.normal(size=(n, args.rank)).astype(np.float32)
    t_ease = timed(
        lambda: top_n_sparse(indptr, items, values, nb_indptr, nb_cols, nb_weights, ids, args.k, indptr, items)
    )
    t_als = timed(lambda: top_n_dot(user_f, item_f, args.k, ids, exclude_indptr=indptr, exclude_indices=items))
    print(
        f"candidates at {n} items, {x.shape[0]} users, top-{args.k}, own items excluded | "
        f"EASE top_n_sparse (top-{args.top_n} neighbours) {seconds(t_ease)} | "
        f"ALS top_n_dot (rank {args.rank}) {seconds(t_als)} | EASE / ALS {t_ease / t_als:.2f}",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    speed = gflops(args.flops_size, rng)
    print(
        f"ease: lambda {args.lam:g}, ~{args.items_per_user} items per user, users = {args.users_per_item:g} x items, "
        f"numpy threads: {blas_threads()}, {psutil.cpu_count()} cores, "
        f"float64 GEMM {speed:.1f} GFLOP/s at {args.flops_size}",
        flush=True,
    )
    last: tuple[int, float] | None = None
    for n in sorted(args.sizes):
        predicted = last[1] * (n / last[0]) ** 3 if last else 0.0
        available = psutil.virtual_memory().available
        if dense_peak_bytes(n) > 0.9 * available:
            print(
                f"{n:>6} items | skipped: needs ~{dense_peak_bytes(n) / GB:.1f} GB, {available / GB:.1f} GB available"
            )
            continue
        if predicted > args.max_fit_seconds:
            print(
                f"{n:>6} items | skipped: fit predicted {predicted:.0f}s > --max-fit-seconds {args.max_fit_seconds:g}"
            )
            continue
        x = interactions(n, int(n * args.users_per_item), args.items_per_user, rng)
        t_fit, b = fit_size(n, x, args, speed)
        last = (n, t_fit)
        if n == args.candidates_size:
            compare_candidates(b, x, args, rng)
        del b, x


if __name__ == "__main__":
    main()
