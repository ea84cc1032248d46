"""Benchmark: seconds per ALS iteration, MLlib with native BLAS vs its pure-JVM fallback vs `implicit`.

Data: the demo generator's shop (`pipelines.generate.make_shop` + `make_events`, no dirt, no bots) at
two sizes, aggregated to one (user, item) pair per row with the clean step's event weights, log1p
confidence. Nothing is written but scratch Parquet files of those pairs.

- MLlib: `pipelines.core.als.build_als` (implicit, shelf's block sizing, checkpointing off) fitted
  with two iteration counts on the cached, deterministic input (after one untimed warm-up fit per
  JVM); seconds per iteration is the difference divided by the extra iterations, so session,
  caching and model set-up costs cancel.
- native vs JVM: each runs in its own Spark driver process (the BLAS is chosen once per JVM). The
  JVM run starts with `-Ddev.ludovic.netlib.blas.nativeLibPath` (and lapack's) pointing at a
  file that does not exist, so dev.ludovic.netlib cannot load the system BLAS and falls back to its
  Java implementation; each run prints the BLAS class MLlib reports (`benchmarks._common.blas_in_use`).
- implicit (benfred, `pip install '.[bench]'`): `AlternatingLeastSquares` with the conjugate-gradient
  solver on the same matrix, rank, regularisation and alpha, two threads, the same two-fit difference.
  It is the single-machine anchor.

    .venv/bin/python -u -m benchmarks.als --sizes 5000x2000 50000x10000 --rank 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import generate
from pipelines.core.config_loading import load_config
from pipelines.core.config_sections import CleanConfig, GenerateConfig
from pipelines.core.runs import parse_as_of
from pipelines.core.schemas import ITEM_IDX, USER_IDX

REPO = Path(__file__).resolve().parents[1]
STRENGTH = "strength"
MISSING_LIB = "/nonexistent/shelf-benchmark/libblas.so.3"
JVM_BLAS_OPTIONS = (
    f"-Ddev.ludovic.netlib.blas.nativeLibPath={MISSING_LIB} -Ddev.ludovic.netlib.lapack.nativeLibPath={MISSING_LIB}"
)


def shop_pairs(users: int, items: int, seed: int = 42) -> pd.DataFrame:
    """(user_idx, item_idx, strength) of the generated shop: weighted event counts per pair, dense ids."""
    cfg = GenerateConfig(users=users, items=items, seed=seed)
    rng = np.random.default_rng(cfg.seed)
    end = parse_as_of(cfg.end)
    events = generate.make_events(cfg, generate.make_shop(cfg, end, rng), end, rng)
    weights = CleanConfig().weights
    events = events.assign(_w=events["event_type"].map(weights).astype("float64"))
    pairs = events.groupby(["user_id", "item_id"], as_index=False)["_w"].sum()
    return pd.DataFrame(
        {
            USER_IDX: pd.factorize(pairs["user_id"])[0].astype("int32"),
            ITEM_IDX: pd.factorize(pairs["item_id"])[0].astype("int32"),
            STRENGTH: np.log1p(pairs["_w"].to_numpy()).astype("float32"),
        }
    )


def implicit_seconds_per_iteration(
    pairs: pd.DataFrame, rank: int, reg: float, alpha: float, iters: tuple[int, int], threads: int
) -> float:
    """implicit's CPU ALS (CG solver): (fit(i2) - fit(i1)) / (i2 - i1) seconds."""
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    shape = (int(pairs[USER_IDX].max()) + 1, int(pairs[ITEM_IDX].max()) + 1)
    matrix = sp.csr_matrix((pairs[STRENGTH].to_numpy(), (pairs[USER_IDX], pairs[ITEM_IDX])), shape=shape)
    times = []
    with threadpool_limits(1, "blas"):  # implicit parallelises itself; nested BLAS threads slow it down
        for n in iters:
            model = AlternatingLeastSquares(
                factors=rank, regularization=reg, alpha=alpha, iterations=n, num_threads=threads, random_state=42
            )
            started = time.perf_counter()
            model.fit(matrix, show_progress=False)
            times.append(time.perf_counter() - started)
    return (times[1] - times[0]) / (iters[1] - iters[0])


def mllib_worker(args: argparse.Namespace) -> None:
    """One Spark driver: MLlib seconds per iteration for each pairs file; prints one JSON line."""
    from pyspark.sql import functions as F

    from benchmarks._common import blas_in_use
    from pipelines.core import als
    from pipelines.core.session import get_spark
    from pipelines.core.sources import read_source

    scratch = tempfile.mkdtemp(prefix="shelf-als-bench-")
    config = load_config(
        REPO / "conf" / "local.yaml",
        [f"storage.root={scratch}/tables", f"spark.jars_dir={REPO / '.jars'}", f"spark.master=local[{args.cores}]"],
    )
    if args.blas == "jvm":
        java_options = f"-Dderby.system.home={scratch} {JVM_BLAS_OPTIONS}"
        config = config.model_copy(
            update={
                "spark": config.spark.model_copy(
                    update={"extra": {**config.spark.extra, "spark.driver.extraJavaOptions": java_options}}
                )
            }
        )
    spark = get_spark(config)
    train = config.train.model_copy(update={"checkpoint_interval": -1})
    params = als.AlsParams(rank=args.rank, reg_param=args.reg, alpha=args.alpha, confidence="raw")
    blocks = als.num_blocks(spark, train)
    result: dict[str, object] = {"blas": blas_in_use(spark), "blocks": blocks, "sizes": {}}
    for path in args.pairs:
        pairs = read_source(spark, path, "parquet", "--pairs").select(
            F.col(USER_IDX), F.col(ITEM_IDX), F.col(STRENGTH).cast("float").alias(als.RATING)
        )
        ratings = als.deterministic_input(pairs, blocks).cache()
        ratings.count()
        if not result["sizes"]:  # JIT warm-up: the first fit in a JVM is slower at any iteration count
            als.build_als(params, train.model_copy(update={"max_iter": 1}), blocks).fit(ratings)
        times = []
        for n in args.iters:
            estimator = als.build_als(params, train.model_copy(update={"max_iter": n}), blocks)
            started = time.perf_counter()
            model = estimator.fit(ratings)
            model.userFactors.count()  # the fit is lazy past the last iteration's factors; force them
            times.append(time.perf_counter() - started)
        ratings.unpersist()
        result["sizes"][path] = (times[1] - times[0]) / (args.iters[1] - args.iters[0])  # type: ignore[index]
    spark.stop()
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(blas: str, files: list[str], args: argparse.Namespace) -> dict[str, object]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.als",
        "--worker",
        blas,
        "--pairs",
        *files,
        "--rank",
        str(args.rank),
        "--reg",
        str(args.reg),
        "--alpha",
        str(args.alpha),
        "--iters",
        *map(str, args.iters),
        "--cores",
        str(args.cores),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"The {blas} MLlib run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["5000x2000", "50000x10000"], help="USERSxITEMS of the shop")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--reg", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=10.0)
    parser.add_argument("--iters", type=int, nargs=2, default=[2, 6], help="the two iteration counts fitted")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--worker", choices=["native", "jvm"], help=argparse.SUPPRESS)
    parser.add_argument("--pairs", nargs="+", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.blas = args.worker
        mllib_worker(args)
        return

    folder = Path(tempfile.mkdtemp(prefix="shelf-als-pairs-"))
    files, shapes, anchor = [], {}, {}
    for size in args.sizes:
        users, items = (int(x) for x in size.split("x"))
        pairs = shop_pairs(users, items)
        path = str(folder / f"{size}.parquet")
        pairs.to_parquet(path, index=False)
        files.append(path)
        shapes[path] = (pairs[USER_IDX].nunique(), pairs[ITEM_IDX].nunique(), len(pairs))
        anchor[path] = implicit_seconds_per_iteration(
            pairs, args.rank, args.reg, args.alpha, tuple(args.iters), args.cores
        )
        print(f"{size}: {shapes[path][2]:,} pairs; implicit {anchor[path]:.3f} s/iteration", flush=True)
    native = run_worker("native", files, args)
    print(f"native run: blas {native['blas']}, {native['blocks']} blocks", flush=True)
    jvm = run_worker("jvm", files, args)
    print(f"jvm run: blas {jvm['blas']}, {jvm['blocks']} blocks", flush=True)

    print()
    print(f"rank {args.rank}, regParam {args.reg}, alpha {args.alpha}, {args.cores} cores; seconds per iteration")
    print("| users x items | pairs | MLlib native | MLlib JVM | implicit | JVM / native | native / implicit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in files:
        users, items, rows = shapes[path]
        nat, jv, imp = native["sizes"][path], jvm["sizes"][path], anchor[path]  # type: ignore[index]
        print(
            f"| {users:,} x {items:,} | {rows:,} | {nat:.3f} | {jv:.3f} | {imp:.3f} | "
            f"{jv / nat:.1f}x | {nat / imp:.1f}x |"
        )


if __name__ == "__main__":
    main()
