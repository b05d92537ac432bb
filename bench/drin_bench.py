"""Rerank latency: DRIN vs MIMIC vs retrieval-only, K = 10 / 100, through the server's Linker.

    python bench/drin_bench.py --model artifacts/demo-model/best --index artifacts/demo-index \\
        --drin artifacts/demo-drin/best --out bench/results/drin.json

Times ``Linker.link`` (FAISS retrieval + store reads + reranking, the request path after
encoding) on already-encoded demo test mentions, for B = 1 and B = 32 mentions per batch and
K = 10 / 100 candidates each. All rerankers are measured side by side in one run, rounds
interleaved, medians reported. Also times the DRIN graph alone (no retrieval or store reads):
the whole graph, its scores alone, and the serving kernel (torch, and its scores as one
onnxruntime graph), call by call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import faiss
import torch

from models.data.schema import load_dataset
from models.drin_kernel import DrinKernel
from models.onnx_drin_kernel import load_drin_kernel
from models.onnx_encoders import default_cache_dir
from service.linker import Linker
from service.primitives import LinkParams, MentionBatch
from service.settings import ServiceSettings
from service.tables import dataset_inputs

RERANKERS = ("none", "mimic", "drin")


def _median_ms(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="artifacts/demo-world")
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--index", default="artifacts/demo-index")
    p.add_argument("--drin", default="artifacts/demo-drin/best")
    p.add_argument("--out", default="bench/results/drin.json")
    p.add_argument("--reps", type=int, default=15, help="timed calls per cell and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)  # more threads than free cores stall every call
    linker = Linker(
        ServiceSettings(
            model_path=a.model,
            index_path=a.index,
            drin_model_path=a.drin,
            device="cpu",
            use_faiss_gpu=False,
        )
    )
    ds = load_dataset(a.data)
    ms = [m for m in ds.split("test") if m.entity_id][:32]
    items = list(dataset_inputs(ds, ms))
    enc = MentionBatch(tuple(items), linker.encode(items))
    linker.warmup()
    cells: dict[tuple[str, int, int], list[float]] = {}
    for _ in range(a.rounds):
        for b in (1, 32):
            feats: MentionBatch = enc.select(range(b))
            for k in (10, 100):
                for r in RERANKERS:
                    params = [LinkParams(top_k=10, candidates_k=k, reranker=r)] * b
                    ms_ = _median_ms(lambda f=feats, p=params: linker.link(f, p), a.reps)
                    cells.setdefault((r, b, k), []).append(ms_)
    # the DRIN graph alone, on the same candidates (no FAISS, no store reads): the whole
    # graph (with the final edges an explanation reads), the graph's scores alone, and the
    # serving kernel (models/drin_kernel.py: the server's rerank), alternating call by call
    variants = ("graph", "scores_only", "kernel", "table", "onnx_table")
    alone: dict[str, dict[str, float]] = {v: {} for v in variants}
    assert linker.drin is not None
    drin_model = linker.drin
    kernel = DrinKernel(drin_model)
    # the same kernel's scores as one onnxruntime graph (models/onnx_drin_kernel.py: the
    # server's CPU default), fed the same entity table
    onnx_kernel = load_drin_kernel(drin_model, "onnx", default_cache_dir(a.model, None), a.threads)
    table = getattr(linker.rerankers["drin"], "table", None)
    assert table is not None, "the demo KB's entity table fits any sensible MEL_DRIN_TABLE_MB"
    for b in (1, 32):
        feats = enc.select(range(b)).encoded
        cand = linker.retrieve(feats, 100)
        for k in (10, 100):
            rows_ = cand.rows[:, :k]
            ents = linker.searcher.drin_parts(rows_)
            image_rows = linker.searcher.image_rows(rows_)
            groups = None if image_rows is None else torch.from_numpy(image_rows)
            rows_t = torch.from_numpy(rows_)
            parts = feats.drin
            assert parts is not None
            calls = {
                "graph": lambda p=parts, e=ents: drin_model(p, e, None),
                "scores_only": lambda p=parts, e=ents: drin_model(p, e, None, final_edges=False),
                "kernel": lambda p=parts, e=ents, g=groups: kernel(p, e, None, g),
                "table": lambda p=parts, e=ents, g=groups, r=rows_t: kernel(
                    p, e, None, g, r, table
                ),
                "onnx_table": lambda p=parts, e=ents, g=groups, r=rows_t: onnx_kernel(
                    p, e, None, g, r, table
                ),
            }
            times: dict[str, list[float]] = {v: [] for v in variants}
            with torch.inference_mode():
                for _ in range(a.reps * a.rounds):
                    for v in variants:
                        t0 = time.perf_counter()
                        calls[v]()
                        times[v].append(1000 * (time.perf_counter() - t0))
            for v in variants:
                alone[v][f"B={b},K={k}"] = round(statistics.median(times[v]), 3)
    rows = [
        {
            "reranker": r,
            "batch": b,
            "candidates": k,
            "median_ms": round(statistics.median(v), 3),
            "rounds_ms": [round(x, 3) for x in v],
            "per_mention_ms": round(statistics.median(v) / b, 3),
        }
        for (r, b, k), v in cells.items()
    ]
    drin = linker.drin.config.drin
    res = {
        "what": "Linker.link (retrieve + store reads + rerank) on encoded demo test mentions",
        "machine": _machine.machine_info(threads=a.threads),
        "drin": {
            "hidden": drin.hidden,
            "layers": drin.layers,
            "text_dim": drin.text_dim,
            "image_dim": drin.image_dim,
        },
        "entities": len(linker.searcher),
        "reps": a.reps,
        "rounds": a.rounds,
        "rows": rows,
        "drin_graph_only_ms": alone["graph"],
        "drin_scores_only_ms": alone["scores_only"],
        "drin_kernel_ms": alone["kernel"],
        "drin_kernel_table_ms": alone["table"],
        "drin_onnx_kernel_table_ms": alone["onnx_table"],
    }
    md = _machine.write_results(Path(a.out), res, render)
    print(md)
    linker.close()
    return 0


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    d = res["drin"]
    lines = [
        "# Rerank latency: DRIN vs MIMIC vs retrieval only",
        "",
        f"{res['what']}; {res['entities']} entities; DRIN d={d['hidden']}, L={d['layers']}. "
        f"Median of {res['rounds']} rounds x {res['reps']} calls, rerankers interleaved.",
        f"Machine: {m['cpu']}, {m['threads']} torch threads, commit {m['commit']}, {m['date']}.",
        "",
        "| batch B | K | retrieval only (ms) | MIMIC (ms) | DRIN (ms) | DRIN / MIMIC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["reranker"], r["batch"], r["candidates"]): r["median_ms"] for r in res["rows"]}
    for b in (1, 32):
        for k in (10, 100):
            none, mimic, drin = (by[(r, b, k)] for r in RERANKERS)
            lines.append(
                f"| {b} | {k} | {none:.2f} | {mimic:.2f} | {drin:.2f} | {drin / mimic:.2f}x |"
            )
    lines += [
        "",
        "DRIN graph alone (no retrieval, no store reads), median ms: "
        + ", ".join(f"{k}: {v:.2f}" for k, v in res["drin_graph_only_ms"].items()),
        "",
    ]
    fast = res.get("drin_scores_only_ms")
    if fast:  # results before the scores-only path have no such row
        lines += [
            "The graph for the scores alone (`final_edges=False`, what the server's rerank "
            "runs; the last layer skips its image vertices and edges), alternating call by "
            "call with the whole graph above:",
            "",
            "| cell | whole graph ms | scores alone ms | speed-up |",
            "| --- | --- | --- | --- |",
        ]
        for cell, t in fast.items():
            full = res["drin_graph_only_ms"][cell]
            lines.append(f"| {cell} | {full:.2f} | {t:.2f} | {full / t:.2f}x |")
        lines.append("")
    kern = res.get("drin_kernel_ms")
    tab = res.get("drin_kernel_table_ms")
    if kern and tab:  # results before the serving kernel have no such rows
        lines += [
            "The serving kernel (`models/drin_kernel.py`: the first layer's entity products "
            "folded into the input projections, each distinct image once), folding per request "
            "and reading the KB's products folded at load (its entity table: the server's DRIN "
            "rerank), in the same alternation:",
            "",
            "| cell | scores-alone graph ms | kernel, folded per request ms | kernel + entity "
            "table ms | table vs scores-alone graph | vs whole graph |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for cell, t in tab.items():
            so, full, k = fast[cell], res["drin_graph_only_ms"][cell], kern[cell]
            lines.append(
                f"| {cell} | {so:.2f} | {k:.2f} | {t:.2f} | {so / t:.2f}x | {full / t:.2f}x |"
            )
        lines.append("")
    onnx = res.get("drin_onnx_kernel_table_ms")
    if onnx and tab:
        lines += [
            "The kernel's scores as one onnxruntime graph (`models/onnx_drin_kernel.py`, the "
            "server's CPU default), fed the same entity table, in the same alternation:",
            "",
            "| cell | torch kernel + entity table ms | onnx kernel + entity table ms | speed-up |",
            "| --- | --- | --- | --- |",
        ]
        for cell, t in onnx.items():
            lines.append(f"| {cell} | {tab[cell]:.2f} | {t:.2f} | {tab[cell] / t:.2f}x |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
