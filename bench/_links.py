"""Shared by the benches that time ``Linker.link`` on a bench work folder, side by side.

``bench/wikimel.py --work`` leaves a MIMIC model, an index and a fusion model in its folder;
:func:`work_linker` serves them as the server would, :func:`encoded_test` encodes test
mentions once, and :func:`time_links` times one pass over them (one mention at a time and 32 at
a time, per reranker) into a dict of per-mention seconds keyed by (side, batch, reranker).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py

from models.data.schema import load_dataset
from service.linker import Linker
from service.primitives import EncodedMentions, LinkParams, MentionBatch, MentionInput
from service.settings import ServiceSettings
from service.tables import dataset_inputs

Times = dict[tuple[str, int, str], list[float]]


def add_work_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--work", type=Path, default=Path("artifacts/bench-wikimel-names-only"))
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--mentions", type=int, default=320)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="the Linker's intra-op threads")


def work_linker(work: Path, threads: int) -> Linker:
    linker = Linker(
        ServiceSettings(
            model_path=str(work / "mimic" / "best"),
            index_path=str(work / "index"),
            fusion_model_path=str(work / "fusion"),
            intra_op_threads=threads,
            device="cpu",
            use_faiss_gpu=False,
        )
    )
    linker.warmup()
    return linker


def encoded_test(linker: Linker, work: Path, n: int) -> tuple[list[MentionInput], EncodedMentions]:
    ds = load_dataset(work / "data")
    items = list(dataset_inputs(ds, ds.split("test")[:n]))
    return items, linker.encode(items)


def time_links(
    linker: Linker,
    items: Sequence[MentionInput],
    encoded: EncodedMentions,
    side: str,
    rerankers: Sequence[str],
    out: Times,
) -> None:
    for b in (1, 32):
        for start in range(0, len(items) - b + 1, b):
            idx = list(range(start, start + b))
            batch = MentionBatch(tuple(items[i] for i in idx), encoded.select(idx))
            for r in rerankers:  # alternating, so noise hits each alike
                params = [LinkParams(top_k=10, candidates_k=100, reranker=r)] * b
                t0 = time.perf_counter()
                linker.link(batch, params)
                out.setdefault((side, b, r), []).append((time.perf_counter() - t0) / b)


def results(
    what: str, a: argparse.Namespace, linker: Linker, mentions: int, per: Times, **extra: Any
) -> dict[str, Any]:
    """The JSON a side-by-side bench writes: its setting, the machine, and per (side, batch,
    reranker) the median ms per mention."""
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
    return {
        "what": what,
        "work": str(a.work),
        "entities": len(linker.searcher),
        **extra,
        "threads": a.threads,
        "mentions": mentions,
        "rounds": a.rounds,
        "machine": _machine.machine_info(threads=a.threads),
        "rows": rows,
    }
