"""Benchmark: how to rank a customer's own past purchases for buy-again, on UCI Online Retail, in numpy.

The file (../shared/data/online-retail, or --path) is read with pandas: lines with a CustomerID, quantity > 0,
not cancelled. Train = invoices before as_of - --test-days (7), test = those days; users who bought in both.
Each score ranks every catalogue item per user (popularity / 1000 breaks ties among items the user never
bought) and is scored NDCG@10 with binary relevance = any item bought in the test week:
- own log1p(days) x 2^(-age / h): `recommend.buy_again_half_life_days` h in --half-lives (shelf's rebuy_score),
- cycle: log1p(days) x exp(-|ln((age + 1) / (usual gap + 1))|), the usual gap being the user's own mean gap,
  else the item's median over its repeat buyers (shelf's score until 2026-12-06),
- ease: EASE (lambda --lam) on log1p(days) input, own items allowed (and, on items new to the user, with its own
  items removed and relevance = the test items the user had not bought before);
- own + ease: the own score (half-life 90) and EASE's, each divided by the user's largest, own weighted 1, 2 or 4:
  the shape of issue 26's "EASE on log-count input plus each customer's own history as a buy-again term".
This is the exploration behind the defaults; what shelf publishes is measured by `shelf run` (docs/BENCHMARKS.md).

    .venv/bin/python -m benchmarks.buy_again --as-of 2011-12-03
    .venv/bin/python -m benchmarks.buy_again --as-of 2011-12-10 --test-days 30 --lam 500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from udfs.ease import fit_ease

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "online-retail" / "online_retail.csv.gz"


def load(path: Path, as_of: pd.Timestamp, test_days: int = 7) -> tuple[pd.DataFrame, dict[int, set[int]], int, int]:
    """Per (user, item) of the training part: days bought, last and first purchase (ages in days before the cut);
    the test days' items."""
    df = pd.read_csv(path, encoding="latin-1").dropna(subset=["CustomerID"])
    df = df[(df.Quantity > 0) & ~df.InvoiceNo.astype(str).str.startswith("C")]
    df["ts"] = pd.to_datetime(df.InvoiceDate)
    cut = as_of - pd.Timedelta(days=test_days)
    train, test = df[df.ts < cut], df[(df.ts >= cut) & (df.ts < as_of)]
    users = {u: i for i, u in enumerate(np.sort(train.CustomerID.unique()))}
    items = {s: i for i, s in enumerate(np.sort(train.StockCode.astype(str).unique()))}
    train = train.assign(
        u=train.CustomerID.map(users), i=train.StockCode.astype(str).map(items), day=train.ts.dt.normalize()
    )
    pairs = train.groupby(["u", "i"]).agg(n=("day", "nunique"), last=("ts", "max"), first=("ts", "min")).reset_index()
    pairs["age"] = (cut - pairs["last"]).dt.total_seconds() / 86400
    pairs["span"] = (cut - pairs["first"]).dt.total_seconds() / 86400
    test = test[test.CustomerID.isin(users)]
    test = test.assign(u=test.CustomerID.map(users), i=test.StockCode.astype(str).map(items)).dropna(subset=["i"])
    truth = {int(u): set(g.i.astype(int)) for u, g in test.groupby("u")}
    return pairs, truth, len(users), len(items)


def ndcg_at_10(scores: np.ndarray, truth: dict[int, set[int]]) -> float:
    users = np.array(sorted(truth))
    top = np.argsort(-scores[users], axis=1, kind="stable")[:, :10]
    discount = 1 / np.log2(np.arange(2, 12))
    total = 0.0
    for row, u in zip(top, users, strict=True):
        hits = np.array([item in truth[u] for item in row])
        total += float((discount * hits).sum() / discount[: min(10, len(truth[u]))].sum())
    return total / len(users)


def ease_figures(
    x: np.ndarray, pairs: pd.DataFrame, truth: dict[int, set[int]], lam: float, tie: np.ndarray
) -> dict[str, float]:
    """EASE alone, own history + EASE blends (any purchase), and EASE on items new to the user."""
    ease = x @ fit_ease(x.T @ x, lam).astype(np.float64)  # shelf's own EASE (udfs/ease.py), float64 inverse
    figures = {f"ease (lambda {lam:g}), any purchase": ndcg_at_10(ease + tie, truth)}
    own = np.zeros_like(x)
    own[pairs.u, pairs.i] = np.log1p(pairs.n) * 2 ** (-pairs.age.clip(lower=0) / 90)
    scaled = ease / (np.abs(ease).max(axis=1, keepdims=True) + 1e-12)
    for weight in (1, 2, 4):
        blend = weight * own / (own.max(axis=1, keepdims=True) + 1e-12) + scaled
        figures[f"own (half-life 90) x {weight} + ease, each / the user's largest, any purchase"] = ndcg_at_10(
            blend + tie, truth
        )
    new = {u: items - set(np.flatnonzero(x[u])) for u, items in truth.items()}
    new = {u: items for u, items in new.items() if items}
    figures[f"ease, items new to the user ({len(new)} users)"] = ndcg_at_10(np.where(x > 0, -np.inf, ease + tie), new)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", type=Path, default=DATA)
    p.add_argument("--as-of", default="2011-12-03")
    p.add_argument("--half-lives", type=float, nargs="+", default=[30, 90, 180, 365])
    p.add_argument("--lam", type=float, default=100.0)
    p.add_argument("--test-days", type=int, default=7, help="days before as_of that are the test (7: shelf's default)")
    args = p.parse_args()
    if not args.path.exists():
        raise SystemExit(f"{args.path} is absent; pass --path to the UCI Online Retail CSV (.csv or .csv.gz).")
    pairs, truth, n_users, n_items = load(args.path, pd.Timestamp(args.as_of), args.test_days)
    x = np.zeros((n_users, n_items), np.float64)
    x[pairs.u, pairs.i] = np.log1p(pairs.n)
    tie = (x > 0).sum(0) / (x > 0).sum(0).max() / 1000
    figures = {}
    for h in args.half_lives:
        own = np.zeros_like(x)
        own[pairs.u, pairs.i] = np.log1p(pairs.n) * 2 ** (-pairs.age.clip(lower=0) / h)
        figures[f"own log1p(days) x 2^(-age/{h:g}), any purchase"] = ndcg_at_10(own + tie, truth)
    gap = np.where(pairs.n >= 2, (pairs.span - pairs.age) / (pairs.n - 1).clip(lower=1), np.nan)
    gap = pd.Series(gap).fillna(pairs.i.map(pd.Series(gap).groupby(pairs.i).median())).fillna(np.nanmedian(gap))
    cycle = np.zeros_like(x)
    cycle[pairs.u, pairs.i] = np.log1p(pairs.n) * np.exp(-np.abs(np.log((pairs.age.clip(lower=0) + 1) / (gap + 1))))
    figures["cycle (until 2026-12-06), any purchase"] = ndcg_at_10(cycle + tie, truth)
    figures.update(ease_figures(x, pairs, truth, args.lam, tie))
    print(
        f"Online Retail, as_of {args.as_of}, the last {args.test_days} days as test: {n_users} users, {n_items} items, "
        f"{len(truth)} test users"
    )
    for name, value in figures.items():
        print(f"  NDCG@10 {value:.4f}  {name}")


if __name__ == "__main__":
    main()
