"""numpy's BLAS pool at the intra-op count against one thread, through the server's Linker.

    python bench/blas_threads.py --work artifacts/bench-wikimel-names-only \\
        --out bench/results/blas-threads.json

``Linker.link`` (retrieval + rerank, after encoding) on encoded test mentions of a bench work
folder (``bench/wikimel.py --work``: its MIMIC model, index and fusion model), one mention at a
time and 32 at a time, MIMIC and fusion, with numpy's BLAS pool at the Linker's intra-op
thread count (how it ran before ``models.threads.pin_numpy_blas``) and at 1 (how the Linker
runs since), alternating side by side in one process, medians per mention. FAISS's own BLAS
keeps the intra-op count on both sides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import _links  # bench/_links.py (bench/ is on sys.path when a script runs)
import _machine  # bench/_machine.py
from threadpoolctl import ThreadpoolController

RERANKERS = ("mimic", "fusion")


def numpy_blas(threads: int) -> None:
    """Set numpy's BLAS pool alone (FAISS's bundled BLAS untouched)."""
    import numpy as np

    root = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lc in ThreadpoolController().lib_controllers:
        if lc.user_api == "blas" and Path(lc.filepath).resolve().parent == root:
            lc.set_num_threads(threads)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _links.add_work_args(p, "bench/results/blas-threads.json")
    a = p.parse_args()
    linker = _links.work_linker(a.work, a.threads)
    items, encoded = _links.encoded_test(linker, a.work, a.mentions)
    sides = {"before": a.threads, "after": 1}
    per: _links.Times = {}
    for _ in range(a.rounds):
        for side, n in sides.items():
            numpy_blas(n)
            _links.time_links(linker, items, encoded, side, RERANKERS, per)
    res = _links.results(
        "Linker.link per mention, numpy's BLAS pool at the intra-op count vs 1",
        a,
        linker,
        len(items),
        per,
        numpy_blas_threads=sides,
    )
    print(_machine.write_results(a.out, res, render))
    linker.close()
    return 0


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    by = {(r["side"], r["batch"], r["reranker"]): r["ms_per_mention"] for r in res["rows"]}
    n = res["threads"]
    lines = [
        "# numpy's BLAS pool: the intra-op count against one thread",
        "",
        f"{res['what']}: {res['work']} ({res['entities']:,} entities), {res['mentions']} test "
        f"mentions, {n} intra-op threads, K = 100; median ms per mention over "
        f"{res['rounds']} rounds, the sides alternating. Machine: {m['cpu']}, commit "
        f"{m['commit']}, {m['date']}.",
        "",
        f"| batch | reranker | numpy BLAS {n} threads | numpy BLAS 1 thread | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b in (1, 32):
        for r in RERANKERS:
            before, after = by[("before", b, r)], by[("after", b, r)]
            lines.append(f"| {b} | {r} | {before:.2f} | {after:.2f} | {before / after:.2f}x |")
    for b in (1, 32):
        add = {s: by[(s, b, "fusion")] - by[(s, b, "mimic")] for s in ("before", "after")}
        lines.append(
            f"\nFusion adds at B={b}: {add['before']:.2f} ms -> {add['after']:.2f} ms per mention."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
