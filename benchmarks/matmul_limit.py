"""This machine's float32 matmul limit, the rate the benchmarks' "fraction of the limit" divides by.

The environment may set OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which pin OpenBLAS to another
kernel than the one it would pick for this CPU (e.g. Haswell, AVX2, on a CPU with AVX-512): a
rate measured under them is not the machine's limit. :func:`measure_limit` therefore measures in
a subprocess with both variables unset; the calling process, the tests and CI keep them as they
are. The rate is numpy's sgemm of ``--size`` x ``--size`` float32 matrices on ``--threads``
threads (the job's thread count), best of ``--repeats``; threadpoolctl reports which OpenBLAS
kernel ran. This script prints the limit next to the rate under the current environment, and
its last line is ``matmul_limit_gflops: <x>``.

    .venv/bin/python benchmarks/matmul_limit.py [--threads 2] [--size 2048] [--quick]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

THROTTLING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
LIMIT_SIZE = 2048


@dataclass(frozen=True)
class MatmulRate:
    """A measured float32 matmul rate and the BLAS that ran it."""

    gflops: float
    threads: int
    size: int
    blas: dict  # threadpoolctl's internal_api, architecture, version of numpy's BLAS
    environment: dict  # the throttling variables as the measuring process saw them (None: unset)

    def describe(self) -> str:
        kernel = ", ".join(f"{k} {v}" for k, v in self.blas.items())
        variables = ", ".join(
            f"{k}={v}" if v is not None else f"{k} unset" for k, v in self.environment.items()
        )
        return (
            f"{self.gflops:.1f} GFLOP/s ({self.size}x{self.size} sgemm, {self.threads} threads; "
            f"{kernel}; {variables})"
        )


def sgemm_gflops(threads: int, size: int = LIMIT_SIZE, repeats: int = 5) -> float:
    """Best float32 matmul rate of numpy's BLAS in this process, on ``threads`` threads."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    best = 0.0
    with threadpool_limits(threads, user_api="blas"):
        a @ b  # warm-up: thread pool start, page faults
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def blas_kernel() -> dict:
    """internal_api, architecture and version of the BLAS numpy loaded in this process."""
    blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    if not blas:
        return {"internal_api": "unknown"}
    return {key: blas[0].get(key) for key in ("internal_api", "architecture", "version")}


def rate_here(threads: int, size: int = LIMIT_SIZE, repeats: int = 5) -> MatmulRate:
    """The matmul rate under this process's environment (throttled if the variables are set)."""
    gflops = sgemm_gflops(threads, size, repeats)
    environment = {name: os.environ.get(name) for name in THROTTLING_VARIABLES}
    return MatmulRate(gflops, threads, size, blas_kernel(), environment)


def measure_limit(threads: int, size: int = LIMIT_SIZE, repeats: int = 5) -> MatmulRate:
    """The real limit: :func:`rate_here` in a subprocess whose environment lacks the
    OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE variables, so OpenBLAS picks this CPU's kernel.
    OpenBLAS reads them when it loads, hence a fresh process rather than unsetting them here."""
    environment = {k: v for k, v in os.environ.items() if k not in THROTTLING_VARIABLES}
    command = [sys.executable, __file__, "--json", "--threads", str(threads), "--size", str(size)]
    command += ["--repeats", str(repeats)]
    completed = subprocess.run(
        command, env=environment, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"matmul limit subprocess failed:\n{completed.stderr}")
    return MatmulRate(**json.loads(completed.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=LIMIT_SIZE)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats: checks it runs")
    parser.add_argument("--json", action="store_true", help="measure here, print one JSON line")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 2
    if args.json:
        rate = rate_here(args.threads, args.size, args.repeats)
        print(json.dumps(rate.__dict__))
        return
    here = rate_here(args.threads, args.size, args.repeats)
    limit = measure_limit(args.threads, args.size, args.repeats)
    print(f"this environment: {here.describe()}")
    print(f"limit:            {limit.describe()}")
    print(f"this environment / limit: {here.gflops / limit.gflops:.3f}")
    print(f"matmul_limit_gflops: {limit.gflops:.1f}")


if __name__ == "__main__":
    main()
