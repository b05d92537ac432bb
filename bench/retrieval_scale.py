"""Retrieval at scale: Flat vs HNSW vs IVF (and the fixes) over MIMIC retrieval vectors.

    python bench/retrieval_scale.py world  --entities 1000000            # text-only KB + queries
    python bench/retrieval_scale.py encode --slices 6                    # 6 x 50k entities
    python bench/retrieval_scale.py search --entities 300000             # every variant
    python bench/retrieval_scale.py render

``world``: :func:`models.data.demo_world.generate_retrieval_world`: the 1,000,000-entity demo
world (seed 1), its KB **text-only** (entities take the no-image rule) and the first 5,000
test mentions with their images.

``encode``: the real index job (``index.build.build``, Flat, ``--no-drin``: the text encoder
path of ``mel-index build``) on consecutive 50k-entity slices of that KB, in KB order, each
into its own folder under ``--work`` (resumable: a finished slice is skipped); the retrieval
vectors of each slice (``index.build.retrieval_keys``: ``[text_cls ; cmfu]`` of the float16
store, so float16 loses nothing) are cached as ``keys-NNN.npy``. Seconds per slice are
recorded: the encoding rate.

``search``: over the first ``--entities`` vectors, exact top 100 by brute force (float32 GEMM),
then each variant: FAISS build seconds, index bytes (``serialize_index``; what the server keeps
in RAM), per-query latency inside batches of 32 (the searcher's own calls: FAISS, then for
``refine`` the exact rescoring from a memory-mapped float32 vector file, as ``retrieval.f32``),
recall@100 against the exact top 100 and the gold's hit@100 (queries whose gold is indexed).
Queries: the first ``--queries`` test mentions (text + image), ``retrieval_queries``, the server's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import faiss
import numpy as np
import torch

from index.ann import AnnSpec, build_index, max_key_norm, search, set_search_params
from index.build import BuildConfig, build, retrieval_keys
from index.ray_engine import RayOptions
from index.search import refine_rows
from index.store import EntityStore
from models.data.demo_world import DemoWorldConfig, generate_retrieval_world
from models.model import LinkingModel
from models.onnx_encoders import ENCODER_RUNTIMES, default_cache_dir, resolve_runtime, use_runtime
from models.preprocess import load_image_or_none, mention_text

logger = logging.getLogger("retrieval_scale")

K = 100
SLICE = 50_000


def _world(a: argparse.Namespace) -> Path:
    return Path(a.work) / f"world-{a.world_entities}-s{a.seed}"


def part_world(a: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    summary = generate_retrieval_world(
        _world(a), DemoWorldConfig(num_entities=a.world_entities, seed=a.seed), queries=5000
    )
    return {**summary, "seconds": round(time.perf_counter() - t, 1)}


def part_encode(a: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    world = _world(a)
    kb = (world / "kb.jsonl").read_bytes().splitlines(keepends=True)
    enc = res.get("encode", {"slices": []})
    done = {s["slice"] for s in enc["slices"]}
    torch.set_num_threads(a.threads)  # the job's torch threads (1 on a shared machine)
    model = LinkingModel.from_pretrained(a.model).eval()
    for i in range(a.slices):
        if i in done or i * SLICE >= len(kb):
            continue
        folder = Path(a.work) / f"slice-{i:03d}"
        part = folder / "kb" / "kb.jsonl"
        part.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(kb[i * SLICE : (i + 1) * SLICE])
        if not part.is_file() or part.read_bytes() != data:  # unchanged: the job resumes
            part.write_bytes(data)
        t = time.perf_counter()
        manifest = build(
            BuildConfig(
                kb=str(part),
                model=a.model,
                out=str(folder / "index"),
                factory="Flat",
                device="cpu",
                progress=False,
                drin_fields=False,
                encoder_runtime=a.encoder_runtime,
                engine=a.engine,
                ray=RayOptions(actors=a.ray_actors, cpus_per_actor=1),
            )
        )
        secs = time.perf_counter() - t
        store = EntityStore(folder / "index")
        n = len(store)
        keys = np.concatenate(
            [retrieval_keys(store, model, s, min(n, s + 65_536)) for s in range(0, n, 65_536)]
        )
        store.close()
        np.save(Path(a.work) / f"keys-{i:03d}.npy", keys.astype(np.float16))
        shutil.rmtree(folder / "index" / "store", ignore_errors=True)  # keys are what we keep
        enc["slices"].append(
            {
                "slice": i,
                "entities": n,
                "seconds": round(secs, 1),
                "entities_per_s": round(n / secs, 1),
                "threads": torch.get_num_threads(),
                "encoder_runtime": getattr(manifest, "encoder_runtime", None),
                "engine": a.engine
                + (f" ({a.ray_actors or 'auto'} actors x 1 thread)" if a.engine == "ray" else ""),
                "build_seconds_manifest": getattr(manifest, "build_seconds", None),
            }
        )
        res["encode"] = enc
        logger.info("slice %d: %d entities in %.0fs (%.1f/s)", i, n, secs, n / secs)
        _save(a, res)  # after every slice: a killed run keeps what it encoded
    return enc


def _keys(a: argparse.Namespace, n: int) -> np.ndarray:
    parts, have = [], 0
    i = 0
    while have < n:
        p = Path(a.work) / f"keys-{i:03d}.npy"
        if not p.is_file():
            raise SystemExit(f"only {have} entities encoded; run `encode` for more slices")
        parts.append(np.load(p, mmap_mode="r"))
        have += len(parts[-1])
        i += 1
    return np.ascontiguousarray(np.concatenate(parts)[:n])


def _queries(a: argparse.Namespace, n: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(queries (Q, d) float32, gold rows (Q,), -1 when the gold is not among the n indexed)."""
    world = _world(a)
    runtime = resolve_runtime(a.encoder_runtime, "minilm-effnet")
    cache = Path(a.work) / f"queries-{a.queries}-{runtime}.npz"
    ids = [json.loads(x)["id"] for x in (world / "kb.jsonl").read_bytes().splitlines()]
    row = {eid: i for i, eid in enumerate(ids)}
    ms = [json.loads(x) for x in (world / "mentions.jsonl").read_text().splitlines()][: a.queries]
    if not cache.is_file():
        model = LinkingModel.from_pretrained(a.model).eval()
        if runtime != "torch":  # the entities' runtime (the server refuses a mismatch)
            use_runtime(model.encoder, runtime, default_cache_dir(a.model), a.threads)
        parts = []
        t = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(ms), 32):
                b = ms[s : s + 32]
                feats = model.encoder.encode(
                    [mention_text(m["mention"], m["sentence"]) for m in b],
                    [load_image_or_none(world / m["image"]) if m.get("image") else None for m in b],
                )
                parts.append(model.matcher.retrieval_queries(feats).float().numpy())
        np.savez(cache, q=np.concatenate(parts), secs=time.perf_counter() - t)
    q = np.load(cache)["q"][: a.queries]
    gold = np.array([row[m["entity_id"]] for m in ms[: a.queries]], dtype=np.int64)
    gold = np.where(gold < n, gold, -1)
    info = {
        "queries": len(q),
        "with_image": sum(bool(m.get("image")) for m in ms[: a.queries]),
        "gold_indexed": int((gold >= 0).sum()),
        "encoder_runtime": runtime,
    }
    return q, gold, info


def exact_top(keys: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) rows of the exact top k by inner product (float32 GEMM over blocks)."""
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((len(q), 0), dtype=np.int64)
    for s in range(0, len(keys), 200_000):
        block = keys[s : s + 200_000].astype(np.float32)
        sc = q @ block.T
        top = np.argpartition(-sc, k, axis=1)[:, :k]
        best_s = np.hstack([best_s, np.take_along_axis(sc, top, 1)])
        best_r = np.hstack([best_r, top + s])
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_r, keep, 1)
    return best_r


def variants(n: int) -> list[tuple[str, dict[str, Any], list[dict[str, int]]]]:
    """(factory, build options, search settings): one build per entry, one row per setting."""
    nlist = 1 << int(np.rint(np.log2(4 * np.sqrt(n))))  # ~4 sqrt(N) lists, a power of two
    ivf = f"IVF{nlist}"
    return [
        ("HNSW32", {}, [{"efSearch": 128}, {"efSearch": 256}]),
        (f"{ivf},Flat", {}, [{"nprobe": 32}, {"nprobe": 128}]),
        (f"{ivf},Flat", {"mips_l2": True}, [{"nprobe": 32}, {"nprobe": 128}]),
        # compressed codes (what fits in 1/4 of Flat's RAM), proposals rescored exactly from
        # the store. PQ with 8-bit codes is left out: on this CPU FAISS trains one 256-centroid
        # sub-quantizer of 16 dims on 5,000 points in ~0.7 s, so PQ96 on a 100k sample would
        # train for tens of minutes; 4-bit fast-scan PQ and scalar quantizers train in seconds.
        (
            f"{ivf},SQ4",
            {"mips_l2": True},
            [
                {"nprobe": 32, "refine": 500},
                {"nprobe": 64, "refine": 500},
                {"nprobe": 64, "refine": 1000},
            ],
        ),
        (
            f"{ivf},SQ6",
            {"mips_l2": True},
            [{"nprobe": 32, "refine": 500}, {"nprobe": 64, "refine": 500}],
        ),
        (
            f"{ivf},PQ64x4fs",
            {"mips_l2": True},
            [{"nprobe": 64, "refine": 1000}, {"nprobe": 128, "refine": 2000}],
        ),
        (f"{ivf},SQ4", {}, [{"nprobe": 64, "refine": 1000}]),
        # a graph over 4-bit codes (what fits in 1/4 of Flat's RAM), refined exactly
        (
            "HNSW16_SQ4",
            {},
            [
                {"efSearch": 128, "refine": 500},
                {"efSearch": 256, "refine": 500},
                {"efSearch": 512, "refine": 500},
                {"efSearch": 1024, "refine": 500},  # the graph's recall falls as N grows
            ],
        ),
        (
            "HNSW24_SQ4",
            {},
            [
                {"efSearch": 256, "refine": 500},
                {"efSearch": 512, "refine": 500},
                {"efSearch": 768, "refine": 500},
                {"efSearch": 1024, "refine": 500},
            ],
        ),
    ]


def ram_bytes(index: Any) -> int:
    """What the index holds in RAM: its serialized size plus IVF-PQ's precomputed tables
    (nlist x M x 2^bits floats, built at load time and not part of the file)."""
    n = int(faiss.serialize_index(index).nbytes)
    ivf = faiss.try_extract_index_ivf(index)
    table = getattr(faiss.downcast_index(ivf), "precomputed_table", None) if ivf else None
    if table is not None:
        with contextlib.suppress(AttributeError, TypeError):
            n += 4 * int(table.size())
    return n


def _time_batches(fn: Any, q: np.ndarray, reps: int = 1) -> tuple[list[float], np.ndarray]:
    per_query, tops = [], []
    for s in range(0, len(q), 32):
        b = q[s : s + 32]
        t = time.perf_counter()
        rows = fn(b)
        per_query.append((time.perf_counter() - t) / len(b))
        tops.append(rows)
    return per_query, np.concatenate(tops)


def part_search(a: argparse.Namespace) -> dict[str, Any]:
    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    n = a.entities
    keys16 = _keys(a, n)
    q, gold, qinfo = _queries(a, n)
    t = time.perf_counter()
    ref = exact_top(keys16, q, K)
    exact_s = time.perf_counter() - t
    keys = keys16.astype(np.float32)
    norm = max_key_norm(n, lambda s, e: keys[s:e])
    # the refine vectors as the server reads them: retrieval.f32, memory-mapped (page cache)
    vec_path = Path(a.work) / f"retrieval-{n}.f32"
    keys.tofile(vec_path)
    vectors = np.memmap(vec_path, dtype="<f4", mode="r", shape=keys.shape)
    rows_out: list[dict[str, Any]] = []

    def row(name: str, build_s: float | None, nbytes: int, per_q: list[float], top: np.ndarray):
        recall = np.mean([len(np.intersect1d(top[i], ref[i])) / K for i in range(len(top))])
        has = gold >= 0
        hit = np.mean([gold[i] in top[i] for i in np.flatnonzero(has)]) if has.any() else 0.0
        r = {
            "index": name,
            "build_s": None if build_s is None else round(build_s, 1),
            "index_bytes": nbytes,
            "bytes_per_entity": round(nbytes / n, 1),
            "memory_vs_flat": round(nbytes / (n * keys.shape[1] * 4), 4),
            "batch32_per_query_p50_ms": round(1000 * float(np.median(per_q)), 3),
            "batch32_per_query_p95_ms": round(1000 * float(np.percentile(per_q, 95)), 3),
            "recall_at_100_vs_exact": round(float(recall), 4),
            "gold_hit_at_100": round(float(hit), 4),
        }
        rows_out.append(r)
        logger.info("%s", r)

    flat = faiss.IndexFlatIP(keys.shape[1])
    flat.add(keys)
    for i in range(min(3, len(q) // 32)):  # warm-up
        search(flat, q[i * 32 : (i + 1) * 32], K)
    per_q, top = _time_batches(lambda b: search(flat, b, K)[1], q)
    row("Flat (exact)", None, int(flat.ntotal * flat.d * 4), per_q, top)
    flat.reset()  # frees its vectors before the next variants are built
    for factory, opts, settings in variants(n):
        if a.only and a.only not in factory:
            continue
        m_norm = norm if opts.get("mips_l2") else None
        t = time.perf_counter()
        index = build_index(
            keys.shape[1],
            factory,
            n,
            lambda s, e: keys[s:e],
            train_sample=a.train_sample,
            use_gpu=False,
            mips_l2_norm=m_norm,
        )
        build_s = time.perf_counter() - t
        nbytes = ram_bytes(index)
        for st in settings:
            set_search_params(index, ef_search=st.get("efSearch"), nprobe=st.get("nprobe"))
            refine = st.get("refine", 0)
            spec = AnnSpec(mips_l2=m_norm is not None, max_norm=m_norm or 0.0, refine=refine)

            def run(b: np.ndarray, index: Any = index, spec: AnnSpec = spec) -> np.ndarray:
                kk = max(K, spec.refine)
                _, cand = search(index, b, kk, spec.max_norm if spec.mips_l2 else None)
                if spec.refine:
                    return refine_rows(b, cand, lambda r: np.take(vectors, r, axis=0), K)[1]
                return cand[:, :K]

            for i in range(min(3, len(q) // 32)):
                run(q[i * 32 : (i + 1) * 32])
            per_q, top = _time_batches(run, q)
            name = ("MIPS->L2 " if spec.mips_l2 else "") + factory
            name += "".join(f" {k}={v}" for k, v in st.items())
            row(name, build_s, nbytes, per_q, top)
        del index
    return {
        "entities": n,
        "world_entities": a.world_entities,
        "entity_encoding": "text only (the no-image rule), by the index job (index.build.build)",
        "query_encoding": "mention text + its image when it has one (test split)",
        "retrieval_dim": int(keys.shape[1]),
        "k": K,
        "max_key_norm": round(norm, 3),
        "exact_top100_s": round(exact_s, 1),
        "threads": a.threads,
        "queries": qinfo,
        "rows": rows_out,
    }


def markdown(res: dict[str, Any]) -> str:
    lines: list[str] = []
    e = res.get("encode")
    if e and e["slices"]:
        n = sum(s["entities"] for s in e["slices"])
        secs = sum(s["seconds"] for s in e["slices"])
        runtimes = sorted({str(s.get("encoder_runtime") or "onnx") for s in e["slices"]})
        lines += [
            f"**Encoding** (the index job, text-only entities, `--no-drin`, CPU, encoder "
            f"runtime {' + '.join(runtimes)}): {n:,} entities "
            f"in {len(e['slices'])} slices of {SLICE:,}, {secs:,.0f} s, **{n / secs:.1f} "
            f"entities/s** (per slice: "
            + ", ".join(f"{s['entities_per_s']:.0f}" for s in e["slices"])
            + f"); 1,000,000 entities at that rate: {1e6 / (n / secs) / 60:.0f} min.",
            "",
        ]
    s = res.get("search")
    if s:
        q = s["queries"]
        lines += [
            f"**Search at {s['entities']:,} entities** (the first {s['entities']:,} of the "
            f"{s['world_entities']:,}-entity demo world, seed 1; entities encoded text-only by "
            f"the index job, encoder runtime {q.get('encoder_runtime', 'onnx')}; "
            f"{q['queries']} test mentions as queries, text + image "
            f"({q['with_image']} have one; {q['gold_indexed']} have their gold indexed); "
            f"d = {s['retrieval_dim']}, inner product, k = {s['k']}; {s['threads']} threads).",
            "",
            "| index | build s | index bytes | bytes/entity | vs Flat memory | batch 32, per "
            "query p50 / p95 ms | recall@100 vs exact | gold in top 100 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in s["rows"]:
            b = "-" if r["build_s"] is None else f"{r['build_s']:.0f}"
            lines.append(
                f"| {r['index']} | {b} | {r['index_bytes']:,} | {r['bytes_per_entity']:,.0f} | "
                f"{100 * r['memory_vs_flat']:.1f}% | {r['batch32_per_query_p50_ms']:.2f} / "
                f"{r['batch32_per_query_p95_ms']:.2f} | {100 * r['recall_at_100_vs_exact']:.1f}% "
                f"| {100 * r['gold_hit_at_100']:.1f}% |"
            )
        m = s["machine"]
        lines += [
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, faiss {m['faiss']}; "
            f"commit {m['commit']}; {m['date']}.",
            "",
        ]
    return "\n".join(lines)


def _save(a: argparse.Namespace, res: dict[str, Any]) -> None:
    _machine.write_results(Path(a.results), res, markdown)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("part", choices=["world", "encode", "search", "render"])
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--work", default="artifacts/scale", help="worlds, slices, cached vectors")
    p.add_argument("--results", default="bench/results/retrieval-scale.json")
    p.add_argument("--world-entities", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slices", type=int, default=20, help="50k-entity slices to encode")
    p.add_argument("--entities", type=int, default=1_000_000, help="search: first N indexed")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="encode: mel-index build's engine (ray: --ray-actors single-threaded actors)",
    )
    p.add_argument("--ray-actors", type=int, default=None)
    p.add_argument(
        "--encoder-runtime",
        choices=ENCODER_RUNTIMES,
        default=None,
        help="encode and queries: the encoder runtime (default: the index job's, onnx)",
    )
    p.add_argument("--train-sample", type=int, default=100_000)
    p.add_argument(
        "--only",
        default="",
        help="search: only variants whose factory contains this; their "
        "rows replace or join those already in --results",
    )
    a = p.parse_args(argv)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    path = Path(a.results)
    res = json.loads(path.read_text()) if path.is_file() else {}
    if a.part == "world":
        res["world"] = {**part_world(a), "machine": _machine.machine_info()}
    elif a.part == "encode":
        res["encode"] = {**part_encode(a, res), "machine": _machine.machine_info()}
    elif a.part == "search":
        new = {**part_search(a), "machine": _machine.machine_info()}
        old = res.get("search")
        if a.only and old and old["entities"] == new["entities"]:
            names = {r["index"] for r in new["rows"]}
            new["rows"] = [
                *(r for r in old["rows"] if r["index"] not in names),
                *new["rows"],
            ]  # the first run's rows, then this run's (its own Flat reference among them)
            new["runs"] = [*old.get("runs", [old["machine"]]), new["machine"]]
        res["search"] = new
    _save(a, res)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
