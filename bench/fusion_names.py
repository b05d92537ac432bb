"""Fusion's candidate names read and analysed at load, against on first sight, side by side.

    python bench/fusion_names.py --work artifacts/bench-wikimel-names-only \\
        --out bench/results/fusion-names.json

``Linker.link`` with reranker=fusion and reranker=mimic on encoded test mentions of a bench
work folder (``bench/wikimel.py --work``), one mention at a time and 32 at a time, medians per
mention. "first sight": the fusion reranker's candidate names read from the store through its
LRU and analysed when a list first holds them, both caches empty at the start of each pass
(how a request met a name before ``CandidateInfoReader`` preloaded them); "at load": read and
analysed before the pass (what the server now does when it loads a KB of up to
``service.rerankers.INFO_PRELOAD`` entities). The sides alternate, pass by pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)

from models import lexical
from models.data.schema import load_dataset
from service.linker import Linker
from service.primitives import LinkParams, MentionBatch
from service.rerankers import CandidateInfoReader, FusionReranker
from service.settings import ServiceSettings
from service.tables import dataset_inputs

SIDES = ("first_sight", "at_load")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=Path("artifacts/bench-wikimel-names-only"))
    p.add_argument("--out", type=Path, default=Path("bench/results/fusion-names.json"))
    p.add_argument("--mentions", type=int, default=320)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="the Linker's intra-op threads")
    a = p.parse_args()
    linker = Linker(
        ServiceSettings(
            model_path=str(a.work / "mimic" / "best"),
            index_path=str(a.work / "index"),
            fusion_model_path=str(a.work / "fusion"),
            intra_op_threads=a.threads,
            device="cpu",
            use_faiss_gpu=False,
        )
    )
    linker.warmup()
    fusion = linker.rerankers["fusion"]
    assert isinstance(fusion, FusionReranker)
    preloaded = fusion.info
    if not preloaded.loaded:
        raise SystemExit(f"{a.work}: the KB is over the preload size; nothing to compare")
    names = [s for info in preloaded.loaded.values() for s in info.names]
    ds = load_dataset(a.work / "data")
    items = dataset_inputs(ds, ds.split("test")[: a.mentions])
    encoded = linker.encode(items)
    per: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(a.rounds):
        for side in SIDES:
            lexical._analyse.cache_clear()
            if side == "at_load":
                fusion.info = preloaded
                lexical.analyse_names(names)
            else:
                fusion.info = CandidateInfoReader(linker.searcher, preload=0)
            for b in (1, 32):
                for start in range(0, len(items) - b + 1, b):
                    idx = list(range(start, start + b))
                    batch = MentionBatch(tuple(items[i] for i in idx), encoded.select(idx))
                    for r in ("mimic", "fusion"):
                        params = [LinkParams(top_k=10, candidates_k=100, reranker=r)] * b
                        t0 = time.perf_counter()
                        linker.link(batch, params)
                        per.setdefault((side, b, r), []).append((time.perf_counter() - t0) / b)
    rows = [
        {
            "side": side,
            "batch": b,
            "reranker": r,
            "ms_per_mention": round(1000 * statistics.median(v), 3),
            "calls": len(v),
        }
        for (side, b, r), v in sorted(per.items())
    ]
    res = {
        "what": "Linker.link per mention: fusion's candidate names on first sight vs at load",
        "work": str(a.work),
        "entities": len(linker.searcher),
        "names": len(names),
        "threads": a.threads,
        "mentions": len(items),
        "rounds": a.rounds,
        "machine": _machine.machine_info(threads=a.threads),
        "rows": rows,
    }
    print(_machine.write_results(a.out, res, render))
    linker.close()
    return 0


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    by = {(r["side"], r["batch"], r["reranker"]): r["ms_per_mention"] for r in res["rows"]}
    lines = [
        "# Fusion's candidate names: on first sight against read and analysed at load",
        "",
        f"{res['what']}: {res['work']} ({res['entities']:,} entities, {res['names']:,} names), "
        f"{res['mentions']} test mentions, {res['threads']} intra-op threads, K = 100 (+ the "
        f"lexical channel's); median ms per mention over {res['rounds']} rounds, the sides "
        f"alternating. Machine: {m['cpu']}, commit {m['commit']}, {m['date']}.",
        "",
        "| batch | MIMIC ms | fusion ms, names on first sight | fusion ms, names at load | "
        "fusion adds: first sight -> at load |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b in (1, 32):
        mimic = statistics.median([by[(s, b, "mimic")] for s in SIDES])
        cold, warm = by[("first_sight", b, "fusion")], by[("at_load", b, "fusion")]
        add_cold = cold - by[("first_sight", b, "mimic")]
        add_warm = warm - by[("at_load", b, "mimic")]
        lines.append(
            f"| {b} | {mimic:.2f} | {cold:.2f} | {warm:.2f} | {add_cold:.2f} -> {add_warm:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
