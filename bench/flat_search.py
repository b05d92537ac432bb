"""One query against a Flat inner-product index: FAISS's IndexFlat.search against
``index.ann.one_query_flat`` (one numpy matrix-vector product and a partial sort), alternating
call by call, medians.

    python bench/flat_search.py --threads 1 [--index artifacts/wikimel-bench/index]

Random unit-free vectors of the serving width (480 = MIMIC's retrieval key with MiniLM) at
two KB sizes, and a built index folder's own FAISS index when ``--index`` is given (its
queries: rows of the index itself). ``--threads``: FAISS's OpenMP threads and numpy's BLAS
threads alike, as the server sets them (models/threads.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py
import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from index.ann import flat_ip_vectors, one_query_flat


def _time(index: Any, queries: np.ndarray, k: int, reps: int) -> dict[str, Any]:
    xb = flat_ip_vectors(index)
    assert xb is not None
    faiss_ms: list[float] = []
    numpy_ms: list[float] = []
    same = 0
    for i in range(reps):
        q = queries[i % len(queries)][None]
        t0 = time.perf_counter()
        _, want = index.search(q, k)
        t1 = time.perf_counter()
        _, got = one_query_flat(xb, q, k)
        t2 = time.perf_counter()
        faiss_ms.append(1000 * (t1 - t0))
        numpy_ms.append(1000 * (t2 - t1))
        same += int(np.array_equal(got, want))
    f, n = statistics.median(faiss_ms), statistics.median(numpy_ms)
    return {
        "entities": int(index.ntotal),
        "dim": int(index.d),
        "k": k,
        "faiss_ms": round(f, 3),
        "one_query_flat_ms": round(n, 3),
        "speedup": round(f / n, 2),
        "same_rows_share": round(same / reps, 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--index", help="an index folder (its faiss.index, if Flat IP)")
    p.add_argument("--sizes", type=int, nargs="*", default=[18_880, 110_000])
    p.add_argument("--dim", type=int, default=480)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/flat-search.json")
    a = p.parse_args()
    faiss.omp_set_num_threads(a.threads)
    rows = []
    with threadpool_limits(a.threads, user_api="blas"):
        rng = np.random.default_rng(0)
        for n in a.sizes:
            xb = rng.standard_normal((n, a.dim)).astype(np.float32)
            index = faiss.IndexFlatIP(a.dim)
            index.add(xb)
            rows.append({"what": f"random {n:,} x {a.dim}", **_time(index, xb[:64], a.k, a.reps)})
            del index, xb
        if a.index:
            index = faiss.read_index(str(Path(a.index) / "faiss.index"))
            xb = flat_ip_vectors(index)
            if xb is None:
                raise SystemExit(f"{a.index}: not a Flat IP index")
            q = np.ascontiguousarray(xb[rng.choice(len(xb), 64, replace=False)])
            rows.append({"what": f"index {a.index}", **_time(index, q, a.k, a.reps)})
    res = {
        "what": "one query, exact top k by inner product: IndexFlat.search vs one_query_flat",
        "machine": _machine.machine_info(("faiss", "numpy"), threads=a.threads),
        "reps": a.reps,
        "rows": rows,
    }
    print(_machine.write_results(Path(a.out), res, render))
    return 0


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# One query against a Flat IP index: FAISS vs one numpy product",
        "",
        f"{res['what']}; alternating call by call, median of {res['reps']} calls each.",
        f"Machine: {m['cpu']}, {m['threads']} thread(s) for FAISS and numpy's BLAS, "
        f"commit {m['commit']}, {m['date']}.",
        "",
        "| vectors | k | FAISS ms | one_query_flat ms | speed-up | same rows |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['what']} | {r['k']} | {r['faiss_ms']:.3f} | {r['one_query_flat_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {100 * r['same_rows_share']:.1f}% |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
