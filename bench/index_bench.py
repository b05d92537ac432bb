"""Index benchmark: build throughput of the offline job, store size, ANN search at 100k entities.

    python bench/index_bench.py build  --kb artifacts/demo-world --model artifacts/demo-model/best
    python bench/index_bench.py search --model artifacts/demo-model/best --entities 100000

``build``: the whole job (``index.build.build``: parse, decode, encode, precompute, write,
finalize, Flat) against the bare encoder forward (``model.encoder.encode`` under
``torch.inference_mode`` on the same batches of the same entities, images already decoded in
memory), alternated in one process, median of ``--reps``; plus the store bytes per entity.

``search``: generates a demo world (``mel-data demo``), builds the real Flat index of its KB
with every entity TEXT-ONLY (``"images": []``, so entities take the no-image rule: encoding
~67k images would take ~45 min on a 2-core CPU), then FAISS HNSW / IVF indexes over the same
stored retrieval vectors (``index.build.retrieval_keys``), and queries them with test-split
mentions of that world (text + their images) through ``MimicMatcher.retrieval_queries``.
Reports build time, index bytes, single-query and batch-32 latency, recall@100 against Flat
and the gold entity's hit rate in the top 100.

Each part updates its own key of ``--results`` (JSON) and rewrites the markdown beside it.
Indexes and worlds go under ``--work`` (``artifacts/bench``, ignored by git).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import faiss
import numpy as np
import torch

from index.ann import build_index, search, set_search_params
from index.build import BuildConfig, build, retrieval_keys
from index.store import FAISS_FILE, EntityStore, Manifest
from models.data.schema import RecordReport, parse_entity
from models.model import LinkingModel
from models.preprocess import entity_text, load_image_or_none, mention_text

logger = logging.getLogger("index_bench")

K = 100


def ann_configs(nlist: int, pq: int) -> list[tuple[str, dict[str, int]]]:
    """(factory, search parameters): one build per factory, one row per parameter setting."""
    return [
        ("Flat", {}),
        ("HNSW32", {"efSearch": 64}),
        ("HNSW32", {"efSearch": 128}),
        ("HNSW32", {"efSearch": 256}),
        (f"IVF{nlist},Flat", {"nprobe": 8}),
        (f"IVF{nlist},Flat", {"nprobe": 32}),
        (f"IVF{nlist},PQ{pq}", {"nprobe": 8}),
        (f"IVF{nlist},PQ{pq}", {"nprobe": 32}),
    ]


# --------------------------------------------------------------------------- environment
def machine_info() -> dict[str, Any]:
    """CPU model and cores, library versions, git commit and date of this run."""
    return _machine.machine_info(
        ("torch", "faiss"),
        torch_threads=torch.get_num_threads(),
        faiss_threads=faiss.omp_get_max_threads(),
    )


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# --------------------------------------------------------------------------- part 1: build
def _job_batches(kb: Path, chunk_size: int, batch_size: int) -> list[list[Any]]:
    """The job's batches: chunks of ``chunk_size`` KB lines, each cut into ``batch_size``."""
    report = RecordReport()
    lines = kb.read_bytes().splitlines()
    batches = []
    for c in range(0, len(lines), chunk_size):
        ents = [
            e
            for raw in lines[c : c + chunk_size]
            if raw.strip() and (e := parse_entity(json.loads(raw), report)) is not None
        ]
        batches.extend(ents[s : s + batch_size] for s in range(0, len(ents), batch_size))
    return batches


def bench_build(a: argparse.Namespace) -> dict[str, Any]:
    kb = Path(a.kb) / "kb.jsonl" if Path(a.kb).is_dir() else Path(a.kb)
    t0 = time.perf_counter()
    model = LinkingModel.from_pretrained(a.model).eval()
    load_s = time.perf_counter() - t0
    batches = _job_batches(kb, a.chunk_size, a.batch_size)
    n = sum(len(b) for b in batches)
    # Everything the bare forward needs is prepared outside the timing: templated texts and
    # decoded images (the first image of an entity, as the job uses).
    inputs = [
        (
            [entity_text(e.name, e.attributes) for e in b],
            [load_image_or_none(kb.parent / e.images[0]) if e.images else None for e in b],
        )
        for b in batches
    ]
    with_image = sum(im is not None for _, ims in inputs for im in ims)
    with torch.inference_mode():  # warm-up: BatchNorm folding + the no-image features, once
        model.encoder.encode(*inputs[0])

    def bare() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for texts, images in inputs:
                model.encoder.encode(texts, images)
        return time.perf_counter() - t

    bare_s, job_s, manifest = [], [], None
    for r in range(a.reps):  # alternate, so drift on a shared machine hits both alike
        bare_s.append(bare())
        out = Path(a.work) / f"build-demo-rep{r}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        manifest = build(
            BuildConfig(
                kb=str(kb),
                model=a.model,
                out=str(out),
                factory="Flat",
                chunk_size=a.chunk_size,
                batch_size=a.batch_size,
                device="cpu",
                progress=False,
                encoder_runtime="torch",  # what the bare forward it is compared with runs
            )
        )
        job_s.append(time.perf_counter() - t)
        logger.info("rep %d: bare %.1fs, job %.1fs (%d entities)", r, bare_s[-1], job_s[-1], n)
    assert isinstance(manifest, Manifest)
    folder = Path(a.work) / f"build-demo-rep{a.reps - 1}"
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    bare_med, job_med = statistics.median(bare_s), statistics.median(job_s)
    return {
        "kb": str(kb),
        "entities": n,
        "entities_with_image": with_image,
        "batch_size": a.batch_size,
        "chunk_size": a.chunk_size,
        "reps": a.reps,
        "model_load_s": round(load_s, 2),
        "bare_encoder_s": [round(s, 2) for s in bare_s],
        "job_s": [round(s, 2) for s in job_s],
        "bare_encoder_entities_per_s": round(n / bare_med, 1),
        "job_entities_per_s": round(n / job_med, 1),
        "job_over_bare": round(bare_med / job_med, 3),
        "manifest_build_seconds": manifest.build_seconds,
        "store_bytes_per_entity": manifest.store_bytes_per_entity,
        "store_fields": manifest.store_fields,
        "folder_bytes_per_entity": round(sum(files.values()) / n, 1),
        "files_bytes": files,
    }


# --------------------------------------------------------------------------- part 2: search
def _world(a: argparse.Namespace) -> Path:
    world = Path(a.work) / f"world-{a.world_entities}-s{a.world_seed}"
    if not (world / "meta.json").is_file():
        mel_data = Path(sys.executable).parent / "mel-data"
        t = time.perf_counter()
        subprocess.run(
            [
                str(mel_data),
                "demo",
                "--out",
                str(world),
                "--entities",
                str(a.world_entities),
                "--seed",
                str(a.world_seed),
            ],
            check=True,
        )
        logger.info("generated %s in %.0fs", world, time.perf_counter() - t)
    return world


def _text_only_kb(world: Path, out: Path, limit: int) -> tuple[Path, int]:
    """The first ``limit`` entities of the world's KB with their images dropped."""
    out.mkdir(parents=True, exist_ok=True)
    kb = out / "kb.jsonl"
    n = 0
    with open(world / "kb.jsonl", encoding="utf-8") as src, open(kb, "w", encoding="utf-8") as f:
        for line in src:
            if n == limit:
                break
            obj = json.loads(line)
            obj["images"] = []
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return kb, n


def _queries(
    world: Path, model: LinkingModel, store: EntityStore, count: int, batch: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(queries (Q, d) float32, gold rows (Q,)) for the first test mentions with a gold row."""
    test = json.loads((world / "splits.json").read_text())["test"]
    wanted = set(test)
    by_id: dict[str, dict[str, Any]] = {}
    with open(world / "mentions.jsonl", encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            if m["id"] in wanted:
                by_id[m["id"]] = m
    picked, gold = [], []
    for mid in test:
        m = by_id.get(mid)
        row = store.row_of(m["entity_id"]) if m and m.get("entity_id") else None
        if row is not None:
            picked.append(m)
            gold.append(row)
        if len(picked) == count:
            break
    t = time.perf_counter()
    parts = []
    with torch.inference_mode():
        for s in range(0, len(picked), batch):
            ms = picked[s : s + batch]
            feats = model.encoder.encode(
                [mention_text(m["mention"], m["sentence"]) for m in ms],
                [load_image_or_none(world / m["image"]) if m.get("image") else None for m in ms],
            )
            parts.append(model.matcher.retrieval_queries(feats).float().numpy())
    secs = time.perf_counter() - t
    info = {
        "queries": len(picked),
        "with_image": sum(bool(m.get("image")) for m in picked),
        "encode_s": round(secs, 1),
        "mentions_per_s": round(len(picked) / secs, 1),
    }
    return np.concatenate(parts), np.asarray(gold, dtype=np.int64), info


def _search_row(
    index: Any, queries: np.ndarray, gold: np.ndarray, flat_top: np.ndarray | None, a: Any
) -> tuple[dict[str, Any], np.ndarray]:
    """Single-query and batch-32 latency, recall@K vs Flat, gold hit@K."""
    for i in range(min(20, len(queries))):  # warm-up (page faults, lazy allocations)
        search(index, queries[i : i + 1], K)
    single: list[float] = []
    deadline = time.perf_counter() + a.time_cap
    for i in range(len(queries)):
        t = time.perf_counter()
        search(index, queries[i : i + 1], K)
        single.append(time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    per_query: list[float] = []
    tops = []
    for s in range(0, len(queries), 32):
        q = queries[s : s + 32]
        t = time.perf_counter()
        _, rows = search(index, q, K)
        per_query.append((time.perf_counter() - t) / len(q))
        tops.append(rows)
    top = np.concatenate(tops)
    ref = top if flat_top is None else flat_top
    recall = np.mean([len(set(top[i][top[i] >= 0]) & set(ref[i])) / K for i in range(len(top))])
    hit = np.mean([gold[i] in top[i] for i in range(len(top))])
    return {
        "single_queries": len(single),
        "single_p50_ms": round(1000 * pct(single, 50), 3),
        "single_p95_ms": round(1000 * pct(single, 95), 3),
        "batch32_per_query_p50_ms": round(1000 * pct(per_query, 50), 3),
        "batch32_per_query_p95_ms": round(1000 * pct(per_query, 95), 3),
        "recall_at_100_vs_flat": round(float(recall), 4),
        "gold_hit_at_100": round(float(hit), 4),
    }, top


def bench_search(a: argparse.Namespace) -> dict[str, Any]:
    world = _world(a)
    out = Path(a.work) / f"search-{a.world_entities}-s{a.world_seed}-first{a.entities}-text-only"
    kb, n = _text_only_kb(world, out / "kb", a.entities)
    index_dir = out / "index-flat"
    shutil.rmtree(index_dir, ignore_errors=True)  # build() would reuse a finished folder
    t = time.perf_counter()
    manifest = build(
        BuildConfig(
            kb=str(kb),
            model=a.model,
            out=str(index_dir),
            factory="Flat",
            device="cpu",
            progress=False,
            encoder_runtime="torch",  # as the recorded figures were measured
        )
    )
    job_s = time.perf_counter() - t
    assert isinstance(manifest, Manifest)
    logger.info("text-only Flat build of %d entities: %.0fs", n, job_s)
    model = LinkingModel.from_pretrained(a.model).eval()
    store = EntityStore(index_dir)
    try:
        t = time.perf_counter()
        keys = np.concatenate(
            [retrieval_keys(store, model, s, min(n, s + 65_536)) for s in range(0, n, 65_536)]
        )
        keys_s = time.perf_counter() - t
        queries, gold, qinfo = _queries(world, model, store, a.queries, a.batch_size)
    finally:
        store.close()
    logger.info("%d queries encoded (%s)", len(queries), qinfo)
    stored_flat = faiss.read_index(str(index_dir / FAISS_FILE))
    rows: list[dict[str, Any]] = []
    flat_top = None
    built: dict[str, tuple[Any, float, int]] = {}
    for factory, params in ann_configs(a.nlist, a.pq):
        if factory not in built:
            t = time.perf_counter()
            if factory == "Flat":
                index = stored_flat  # the job's own index
            else:
                index = build_index(
                    keys.shape[1], factory, n, lambda s, e: keys[s:e], use_gpu=False
                )
            build_s = time.perf_counter() - t
            built = {factory: (index, build_s, int(faiss.serialize_index(index).nbytes))}
        index, build_s, nbytes = built[factory]
        set_search_params(index, ef_search=params.get("efSearch"), nprobe=params.get("nprobe"))
        res, top = _search_row(index, queries, gold, flat_top, a)
        if factory == "Flat":
            flat_top = top
        rows.append(
            {
                "index": factory + "".join(f" {k}={v}" for k, v in params.items()),
                "factory": factory,
                "params": params,
                "build_s": round(build_s, 1) if factory != "Flat" else None,
                "index_bytes": nbytes,
                "bytes_per_entity": round(nbytes / n, 1),
                **res,
            }
        )
        logger.info("%s", rows[-1])
    return {
        "world": str(world),
        "world_entities": a.world_entities,
        "world_seed": a.world_seed,
        "entities": n,
        "entity_encoding": "text only: every entity's images dropped (the no-image rule)",
        "query_encoding": "mention text + its image when it has one (test split)",
        "retrieval_dim": int(keys.shape[1]),
        "k": K,
        "flat_job_s": round(job_s, 1),
        "flat_job_entities_per_s": round(n / job_s, 1),
        "flat_build_seconds_manifest": manifest.build_seconds,
        "retrieval_keys_s": round(keys_s, 1),
        "queries": qinfo,
        "faiss_threads": faiss.omp_get_max_threads(),
        "rows": rows,
    }


# --------------------------------------------------------------------------- output
def markdown(res: dict[str, Any]) -> str:
    lines: list[str] = []
    b = res.get("build")
    if b:
        lines += [
            f"**Build throughput** ({b['entities']} demo-world entities, "
            f"{b['entities_with_image']} with an image; batch {b['batch_size']}, chunk "
            f"{b['chunk_size']}; median of {b['reps']}; Flat)",
            "",
            "| measurement | seconds (each rep) | entities/s |",
            "| --- | --- | --- |",
            f"| bare encoder forward (`model.encoder.encode`, images pre-decoded) | "
            f"{', '.join(f'{s:.1f}' for s in b['bare_encoder_s'])} | "
            f"{b['bare_encoder_entities_per_s']:.1f} |",
            f"| whole job (`index.build.build`: load model, parse, decode, encode, precompute, "
            f"write, finalize) | {', '.join(f'{s:.1f}' for s in b['job_s'])} | "
            f"{b['job_entities_per_s']:.1f} |",
            f"| **job / bare** | | **{100 * b['job_over_bare']:.1f}%** (goal >= 80%) |",
            "",
            f"Store: **{b['store_bytes_per_entity']:,} bytes/entity** (float16 MIMIC records, "
            f"from the manifest); whole index folder (store + Flat + metadata): "
            f"{b['folder_bytes_per_entity']:,.0f} bytes/entity. Model load, cold, "
            f"before the reps: {b['model_load_s']:.1f} s (each job's own, warm load is in its "
            "time).",
            "",
            _machine_line(b["machine"]),
            "",
        ]
    s = res.get("search")
    if s:
        q = s["queries"]
        lines += [
            f"**Search at {s['entities']:,} entities** (demo world seed {s['world_seed']}; "
            f"**entities encoded text-only**: images dropped, the no-image rule; "
            f"{q['queries']} test mentions as queries, text + image ({q['with_image']} have "
            f"one); d = {s['retrieval_dim']}, inner product, k = {s['k']}; "
            f"{s['faiss_threads']} FAISS threads). Text-only Flat job: "
            f"{s['flat_job_s']:.0f} s ({s['flat_job_entities_per_s']:.0f} entities/s)"
            + (
                f"; {s['entities']:,} rather than 100,000 entities because at that rate a 100k "
                f"encode would take ~{100_000 / s['flat_job_entities_per_s'] / 60:.0f} min."
                if s["entities"] < 100_000
                else "."
            ),
            "",
            "| index | build s | index bytes | bytes/entity | 1 query p50 / p95 ms | "
            "batch 32, per query p50 / p95 ms | recall@100 vs Flat | gold in top 100 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in s["rows"]:
            build_s = "-" if r["build_s"] is None else f"{r['build_s']:.1f}"
            lines.append(
                f"| {r['index']} | {build_s} | {r['index_bytes']:,} | {r['bytes_per_entity']:,.0f}"
                f" | {r['single_p50_ms']:.2f} / {r['single_p95_ms']:.2f} | "
                f"{r['batch32_per_query_p50_ms']:.3f} / {r['batch32_per_query_p95_ms']:.3f} | "
                f"{100 * r['recall_at_100_vs_flat']:.1f}% | {100 * r['gold_hit_at_100']:.1f}% |"
            )
        lines += ["", _machine_line(s["machine"]), ""]
    return "\n".join(lines)


def _machine_line(m: dict[str, Any]) -> str:
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores (torch {m['torch_threads']} threads, FAISS "
        f"{m['faiss_threads']}); torch {m['torch']}, faiss {m['faiss']}; commit {m['commit']}; "
        f"{m['date']}."
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "part", choices=["build", "search", "render"], help="render: rewrite the markdown only"
    )
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--work", default="artifacts/bench", help="scratch folder (worlds, indexes)")
    p.add_argument("--results", default="bench/results/index.json")
    p.add_argument("--batch-size", type=int, default=64, help="the job's default")
    p.add_argument("--chunk-size", type=int, default=1024, help="the job's default")
    g = p.add_argument_group("build")
    g.add_argument("--kb", default="artifacts/demo-world", help="dataset folder or kb.jsonl")
    g.add_argument("--reps", type=int, default=2)
    g = p.add_argument_group("search")
    g.add_argument("--world-entities", type=int, default=100_000)
    g.add_argument("--world-seed", type=int, default=1)
    g.add_argument("--entities", type=int, default=100_000, help="first N entities indexed")
    g.add_argument("--queries", type=int, default=1000)
    g.add_argument(
        "--time-cap", type=float, default=30.0, help="seconds of single-query timing per row"
    )
    g.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    g.add_argument("--pq", type=int, default=48, help="PQ sub-quantizers (divides d = 480)")
    a = p.parse_args(argv)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    path = Path(a.results)
    res = json.loads(path.read_text()) if path.is_file() else {}
    if a.part != "render":
        part = bench_build(a) if a.part == "build" else bench_search(a)
        res[a.part] = {**part, "machine": machine_info()}
    print(_machine.write_results(path, res, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
