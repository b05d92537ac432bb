"""Speed of the serving path's model work, and what each speed-up costs in quality.

    flock /work/heavy.lock python bench/speed.py --part encoders --threads 1
    flock /work/heavy.lock python bench/speed.py --part surface --threads 1
    flock /work/heavy.lock python bench/speed.py --part kernel --threads 1
    flock /work/heavy.lock python bench/speed.py --part quality --threads 1
    flock /work/heavy.lock python bench/speed.py --part store --threads 1
    python bench/speed.py --render          # rewrite results/speed.md from the JSON

Each part writes its own section of ``bench/results/speed.json`` (with the machine, commit and
date it ran on; the others are kept) and the markdown is rendered from the whole file. Every
timing compares its variants side by side in ONE run, alternating them rep by rep (never two
separate runs), at a thread count set deliberately (``--threads``: torch and onnxruntime
intra-op threads); medians of ``--reps``.

``encoders``  the frozen towers per encoder runtime (torch, onnx, onnx-int8): demo-world
              entity texts (batches of 32 and 1) and images (batches of 16 and 1).
``surface``   the string-only pass of names and mention strings (the fusion stage's name
              cosine): padded to 40 tokens (before) against padded to the batch's longest.
``kernel``    MIMIC over B x K candidates: the released computation (``MimicMatcher.score``:
              the entity side recomputed from encoder features per request), today's serving
              path (``score_precomputed`` over stored records: one product per pair), the new
              kernel in torch (``models.rerank_kernel.score_candidates``) and as one
              onnxruntime graph (``models.onnx_kernel``, the server's CPU default), and the
              FLOP floor: a pure square GEMM doing the kernel's matmul FLOPs, and the
              attention GEMM alone.
``quality``   the demo world encoded by each encoder runtime (the torch-trained model), test
              split: full-KB and two-stage (top 100 + rerank) H@1 / MRR; the int8 text
              tower's cosine to fp32; and the store codecs' effect (float16 records vs the
              q8 fields of index/encode.py FIELD_CODECS).
``store``     bytes per entity of the store layouts (version 1: every field float16 per
              entity; version 2: image fields once per image record, q8 fields), from the
              demo index the job builds, and the rerank with its store reads (v1 folder +
              score_precomputed, today's server, vs v2 folder + score_candidates); and
              the onnx kernel over the float32 read vs over the records as stored (the
              codes gathered and decoded inside its graph, the server's path).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import numpy as np
import torch

from index.build import BuildConfig, build
from index.encode import FIELD_CODECS, store_fields, store_layout
from index.search import IndexSearcher
from index.store import STORE_DIR, EntityStore, Manifest, encode_rows, row_bytes
from models.data.schema import load_dataset
from models.encoders import MimicEncoder
from models.evaluate import entity_records, evaluate_split
from models.features import dataset_features
from models.mimic import MimicEntityRecord, MimicFeatures, MimicMatcher
from models.model import LinkingModel
from models.onnx_encoders import ENCODER_RUNTIMES, use_runtime
from models.onnx_kernel import OnnxKernel, ensure_kernel_export, load_kernel
from models.preprocess import entity_text, image_batch, load_image_or_none
from models.rerank_kernel import score_candidates
from models.scoring import project_rows
from models.threads import configure_threads

logger = logging.getLogger("speed")
OUT = Path("bench/results/speed.json")


def timed_alternating(
    fns: dict[str, Callable[[], Any]], reps: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds of each function per rep, the functions taking turns within every rep in an
    order shuffled per rep (seeded), so no function always runs after the same one: what ran
    just before changes a small call's time (the onnx kernel at 1 x 100 took ~1.2 ms right
    after the torch kernel and ~0.9 ms right after itself, a fixed order's bias)."""
    for fn in fns.values():  # warm-up: lazy init, allocator, caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(seed)
    order = list(fns)
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            fn = fns[k]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def timed_pairs(
    fns: dict[str, Callable[[Any], Any]], inputs: list[Any], before: Callable[[], Any] | None
) -> dict[str, list[float]]:
    """Seconds of each function on each input in turn (the first input as warm-up), the
    functions' order alternating per input, ``before`` run ahead of every timed call: two
    ways of doing one thing, each call from the same state."""
    names = list(fns)
    for fn in fns.values():
        fn(inputs[0])
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, x in enumerate(inputs[1:]):
        for n in names if i % 2 == 0 else names[::-1]:
            if before is not None:
                before()
            t0 = time.perf_counter()
            fns[n](x)
            times[n].append(time.perf_counter() - t0)
    return times


_SWEEP = np.ones(64 << 18, dtype=np.float32)  # 64 MB


def sweep() -> None:
    """Touch 64 MB, one write per cache line: the caches hold none of the timed call's data."""
    _SWEEP[::16] += 1.0


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _encoders(model_dir: str, cache: Path, threads: int) -> dict[str, MimicEncoder]:
    out = {}
    for rt in ENCODER_RUNTIMES:
        enc = LinkingModel.from_pretrained(model_dir).eval().encoder
        use_runtime(enc, rt, cache, threads)
        out[rt] = enc
    return out


# ---------------------------------------------------------------------- encoders
@torch.inference_mode()
def part_encoders(a: argparse.Namespace, threads: int) -> dict[str, Any]:
    ds = load_dataset(a.data)
    encs = _encoders(a.model, Path(a.work) / "onnx", threads)
    texts = [entity_text(e.name, e.attributes) for e in ds.entities[:32]]
    paths = [ds.resolve(e.images[0]) for e in ds.entities if e.images][:16]
    imgs = [load_image_or_none(p) for p in paths]
    bb = encs["torch"].backbone
    pixels = image_batch(imgs, bb.image_transform, bb.pixel_size).pixel_values
    tok = bb.tokenizer(texts)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    fns: dict[str, Callable[[], Any]] = {}
    for rt, enc in encs.items():
        b = enc.backbone
        fns[f"{rt}|text|32"] = lambda b=b: b.encode_text(ids, mask)
        fns[f"{rt}|text|1"] = lambda b=b: b.encode_text(ids[:1], mask[:1])
        fns[f"{rt}|image|16"] = lambda b=b: b.encode_pixels(pixels)
        fns[f"{rt}|image|1"] = lambda b=b: b.encode_pixels(pixels[:1])
    times = timed_alternating(fns, a.reps)
    rows = []
    for key, ts in times.items():
        rt, tower, batch = key.split("|")
        rows.append(
            {
                "runtime": rt,
                "tower": tower,
                "batch": int(batch),
                "seconds": med(ts),
                "items_per_s": int(batch) / med(ts),
                "reps": [round(t, 5) for t in ts],
            }
        )
    for r in rows:
        base = next(
            x
            for x in rows
            if x["runtime"] == "torch" and x["tower"] == r["tower"] and x["batch"] == r["batch"]
        )
        r["speedup_vs_torch"] = base["seconds"] / r["seconds"]
    return {"rows": rows, "texts": len(texts), "images": len(imgs)}


# ---------------------------------------------------------------------- surface
@torch.inference_mode()
def part_surface(a: argparse.Namespace, threads: int) -> dict[str, Any]:
    """The fusion stage's string-only pass (entity names at index time, the mention string per
    request): padded to ``text_max_length`` as before (``text_features(...).global_``) against
    padded to the batch's longest (``surface_features``), per runtime, alternating."""
    ds = load_dataset(a.data)
    encs = _encoders(a.model, Path(a.work) / "onnx", threads)
    sets = {
        "entity names": [e.name for e in ds.entities[:32]],
        "mention strings": [m.mention for m in ds.split("test")[:32]],
    }
    fns: dict[str, Callable[[], Any]] = {}
    diff: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for what, texts in sets.items():
        tokens[what] = int(
            encs["torch"].backbone.tokenizer(texts, to_longest=True)["input_ids"].shape[1]
        )
        for rt, enc in encs.items():
            for b in (32, 1):
                xs = texts[:b]
                fns[f"{rt}|{what}|{b}|padded"] = lambda e=enc, xs=xs: e.text_features(xs).global_
                fns[f"{rt}|{what}|{b}|longest"] = lambda e=enc, xs=xs: e.surface_features(xs)
            full, short = enc.text_features(texts).global_, enc.surface_features(texts)
            diff[f"{rt}|{what}"] = float((full - short).abs().max())
    times = timed_alternating(fns, a.reps)
    rows = []
    for key in [k for k in times if k.endswith("|padded")]:
        rt, what, b, _ = key.split("|")
        old, new = med(times[key]), med(times[key.replace("|padded", "|longest")])
        rows.append(
            {
                "runtime": rt,
                "texts": what,
                "batch": int(b),
                "padded_ms": 1e3 * old,
                "longest_ms": 1e3 * new,
                "speedup": old / new,
                "max_abs_diff": diff[f"{rt}|{what}"],
            }
        )
    return {"rows": rows, "longest_tokens": tokens}


# ---------------------------------------------------------------------- kernel
def _feats(lead: tuple[int, ...], dt: int, dv: int, L: int, P: int, g: torch.Generator):
    def r(*s: int) -> torch.Tensor:
        return torch.randn(*lead, *s, generator=g)

    return MimicFeatures(r(dt), r(L, dt), r(dv), r(P, dv))


def kernel_flops(b: int, k: int, L: int, h: int) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of score_candidates' products at B x K."""
    pairs = b * k
    return {
        "attention_logits": 2 * pairs * L * L * h,  # (K L, h) x (h, L) per mention
        "softmax_mean": 2 * pairs * L * L,  # (1, L) x (L, L) per pair
        "context": 2 * pairs * L * h,  # (K, L) x (L, h) per mention
        "vdlu": 2 * pairs * (2 * h * h + 2 * h),  # two DUAL blocks: fc (h x h) + gate
        "inner_products": 2 * pairs * (h + h + h),  # g2l, g2g (dt ~ h order), S_C
    }


@torch.inference_mode()
def part_kernel(a: argparse.Namespace, threads: int) -> dict[str, Any]:
    model = LinkingModel.from_pretrained(a.model).eval()
    matcher: MimicMatcher = model.matcher
    cfg = model.config
    dt, h, L = cfg.mimic.dt, cfg.mimic.tglu_hidden_dim, cfg.encoder.text_max_length
    # real inputs: demo-world test mentions and their retrieved candidates, through the
    # trained model (the attention logits' range, and so the softmax's cost, depend on them)
    ds = load_dataset(a.data)
    feats = dataset_features(model.encoder, ds, Path(a.work) / "cache")
    records = entity_records(model, feats.entities)
    keys = matcher.retrieval_keys(records)
    test = [m for m in ds.split("test") if m.entity_id is not None]
    matcher64 = copy.deepcopy(matcher).double()
    onnx = OnnxKernel(ensure_kernel_export(matcher, Path(a.work) / "onnx"), threads)
    g = torch.Generator().manual_seed(0)
    # the machine's GEMM peak at these threads: a large square fp32 product
    n = 1024
    x, y = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    peak_t = med(timed_alternating({"mm": lambda: x @ y}, max(3, a.reps // 2))["mm"])
    peak = 2 * n**3 / peak_t
    rows = []
    for b, k in ((1, 100), (32, 100), (1, 1000)):
        r = feats.mention_rows(test[:b])
        men = project_rows(model.encoder, feats.mentions, r, feats.mentions.first_image_rows(r))
        cand = (matcher.retrieval_queries(men) @ keys.T).topk(k, dim=1).indices  # (B, K)
        flat = cand.reshape(-1)
        ent = project_rows(
            model.encoder, feats.entities, flat, feats.entities.first_image_rows(flat)
        ).map(lambda t, b=b, k=k: t.reshape(b, k, *t.shape[1:]))
        rec = records.map(lambda t, cand=cand: t[cand])
        # image-table row 0 = no image, as the store's image row 0
        no_image = feats.entities.first_image_rows(flat).reshape(b, k) == 0
        # the same lists as a text-only KB would give them (WikiMEL: no entity has an image):
        # every candidate's VDLU fields the no-image record
        blank_row = int(
            torch.nonzero(feats.entities.first_image_rows(torch.arange(len(keys))) == 0)[0]
        )
        text_only = MimicEntityRecord(
            *(
                getattr(records, f)[blank_row].expand_as(getattr(rec, f))
                if f in ("e2m_query", "m2e_key", "m2e_pooled")
                else getattr(rec, f)
                for f in MimicEntityRecord.field_names()
            )
        )
        all_blank = torch.ones(b, k, dtype=torch.bool)
        flops = kernel_flops(b, k, L, h)
        total = sum(flops.values())
        side = max(1, round((total / 2) ** (1 / 3)))
        sq = torch.randn(side, side, generator=g), torch.randn(side, side, generator=g)
        q = rec.tglu_query.reshape(b, k * L, h)
        kt = torch.randn(b, h, L, generator=g)
        fns = {
            "released": lambda men=men, ent=ent: matcher.score(men, ent),
            "precomputed": lambda men=men, rec=rec: matcher.score_precomputed(men, rec),
            "kernel": lambda men=men, rec=rec: score_candidates(matcher, men, rec),
            "kernel_text_only_kb": lambda men=men, rec=text_only, nb=all_blank: score_candidates(
                matcher, men, rec, no_image=nb
            ),
            "onnx": lambda men=men, rec=rec, ni=no_image: onnx(men, rec, ni),
            "onnx_text_only_kb": lambda men=men, rec=text_only, nb=all_blank: onnx(men, rec, nb),
            "floor_gemm": lambda sq=sq: sq[0] @ sq[1],
            "attention_gemm": lambda q=q, kt=kt: torch.bmm(q, kt),
        }
        times = {k_: med(v) for k_, v in timed_alternating(fns, a.reps).items()}
        ref = matcher.score_precomputed(men, rec)
        got = score_candidates(matcher, men, rec)
        diff = max(
            float((getattr(got, f) - getattr(ref, f)).abs().max())
            for f in ("score", "tglu", "vdlu", "cmfu")
        )
        got_o = onnx(men, rec, no_image)
        diff_onnx = max(
            float((getattr(got_o, f) - getattr(ref, f)).abs().max())
            for f in ("score", "tglu", "vdlu", "cmfu")
        )
        diff_onnx_text_only = float(
            (
                onnx(men, text_only, all_blank).score
                - matcher.score_precomputed(men, text_only).score
            )
            .abs()
            .max()
        )
        got_t = score_candidates(matcher, men, text_only, no_image=all_blank)
        ref_t = matcher.score_precomputed(men, text_only)
        diff_text_only = float((got_t.score - ref_t.score).abs().max())
        released = matcher.score(men, ent)
        # both float32 paths against float64 (the exact scores, up to float64 rounding)
        exact = matcher64.score_precomputed(
            men.map(torch.Tensor.double), rec.map(torch.Tensor.double)
        ).score
        rows.append(
            {
                "B": b,
                "K": k,
                "ms": {k_: 1e3 * v for k_, v in times.items()},
                "imageless_candidates": int(no_image.sum()),
                "kernel_vs_released": times["released"] / times["kernel"],
                "max_abs_diff_text_only_kb": diff_text_only,
                "kernel_vs_precomputed": times["precomputed"] / times["kernel"],
                "kernel_flops": flops,
                "floor_gemm_side": side,
                "floor_ms_at_peak": 1e3 * total / peak,
                "kernel_vs_floor_gemm": times["kernel"] / times["floor_gemm"],
                "kernel_vs_floor_at_peak": times["kernel"] / (total / peak),
                "onnx_vs_released": times["released"] / times["onnx"],
                "onnx_vs_torch_kernel": times["kernel"] / times["onnx"],
                "onnx_vs_floor_gemm": times["onnx"] / times["floor_gemm"],
                "max_abs_diff_onnx_vs_precomputed": diff_onnx,
                "max_abs_diff_onnx_text_only_kb": diff_onnx_text_only,
                "onnx_error_vs_float64": float((got_o.score.double() - exact).abs().max()),
                "max_abs_diff_vs_precomputed": diff,
                "max_abs_diff_vs_released": float((got.score - released.score).abs().max()),
                "max_abs_score": float(ref.score.abs().max()),
                "kernel_error_vs_float64": float((got.score.double() - exact).abs().max()),
                "precomputed_error_vs_float64": float((ref.score.double() - exact).abs().max()),
            }
        )
        logger.info("B=%d K=%d: %s", b, k, {k_: round(1e3 * v, 3) for k_, v in times.items()})
    return {"rows": rows, "gemm_peak_gflops": peak / 1e9, "L": L, "h": h, "dt": dt}


# ---------------------------------------------------------------------- quality
def _metrics(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(m[k]) for k in ("H@1", "H@5", "MRR") if k in m}


def _coded(records: MimicEntityRecord, codecs: dict[str, str]) -> MimicEntityRecord:
    """Records as the store holds them: float16, or q8 where ``codecs`` says (decoded)."""

    def one(name: str, t: torch.Tensor) -> torch.Tensor:
        codec = codecs.get(name, "f16")
        if codec == "f16":
            return t.half().float()
        q, scale = encode_rows(t.numpy(), "q8")
        return torch.from_numpy(q.astype(np.float32) * scale.astype(np.float32)[..., None])

    return MimicEntityRecord(
        *(one(f, getattr(records, f)) for f in MimicEntityRecord.field_names())
    )


def part_quality(a: argparse.Namespace, threads: int) -> dict[str, Any]:
    ds = load_dataset(a.data)
    encs = _encoders(a.model, Path(a.work) / "onnx", threads)
    model = LinkingModel.from_pretrained(a.model).eval()
    out: dict[str, Any] = {"runtimes": {}, "codecs": {}}
    feats_by = {}
    for rt, enc in encs.items():
        t0 = time.perf_counter()
        model.encoder = enc
        feats = dataset_features(enc, ds, Path(a.work) / "cache")
        feats_by[rt] = feats
        records = entity_records(model, feats.entities)
        stored = _coded(records, {})  # float16, as the index job stores them
        full = evaluate_split(model, ds, feats, "test", records=stored)
        two = evaluate_split(model, ds, feats, "test", records=stored, candidates=100)
        out["runtimes"][rt] = {
            "full_kb": _metrics(full),
            "two_stage_100": _metrics(two),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        logger.info("%s: %s %s", rt, _metrics(full), _metrics(two))
    # the int8 text tower against fp32 (sentence embeddings: unit vectors)
    for rt in ("onnx", "onnx-int8"):
        cos = torch.cat(
            [
                (getattr(feats_by[rt], t).text_global * getattr(feats_by["torch"], t).text_global)
                .sum(-1)
                .float()
                for t in ("entities", "mentions")
            ]
        )
        out["runtimes"][rt]["text_cosine_to_torch"] = {
            "min": float(cos.min()),
            "p01": float(cos.quantile(0.01)),
            "mean": float(cos.mean()),
            "texts": len(cos),
        }
    # the store codecs, on the torch features: float16 records vs the q8 fields
    model.encoder = encs["torch"]
    feats = feats_by["torch"]
    records = entity_records(model, feats.entities)
    for label, codecs in (("f16", {}), ("chosen", FIELD_CODECS)):
        stored = _coded(records, codecs)
        out["codecs"][label] = {
            "codecs": dict(codecs),
            "full_kb": _metrics(evaluate_split(model, ds, feats, "test", records=stored)),
            "two_stage_100": _metrics(
                evaluate_split(model, ds, feats, "test", records=stored, candidates=100)
            ),
        }
    # how far the q8 records move the scores (two-stage lists of 200 test mentions)
    test = [m for m in ds.split("test") if m.entity_id is not None][:200]
    rows = feats.mention_rows(test)
    text, image = feats.mentions.gather(rows, feats.mentions.first_image_rows(rows))
    with torch.inference_mode():
        men = model.encoder.project(text, image)
        cand = (
            (model.matcher.retrieval_queries(men) @ model.matcher.retrieval_keys(records).T)
            .topk(100, dim=1)
            .indices
        )
        f16 = _coded(records, {}).map(lambda t: t[cand])
        q8 = _coded(records, FIELD_CODECS).map(lambda t: t[cand])
        s16 = score_candidates(model.matcher, men, f16)
        s8 = score_candidates(model.matcher, men, q8)
    out["codecs"]["score_shift_q8_vs_f16"] = {
        f: float((getattr(s8, f) - getattr(s16, f)).abs().max())
        for f in ("score", "tglu", "vdlu", "cmfu")
    }
    out["codecs"]["score_scale"] = float(s16.score.abs().max())
    return out


# ---------------------------------------------------------------------- store
def _downgrade_v1(src: Path, dst: Path) -> None:
    """The folder in the version 1 layout (every field float16 per entity), for the read
    comparison: today's server reads such folders."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    m = Manifest.load(dst)
    store = EntityStore(dst)
    full = {f: store.rows(f, range(m.entity_count)) for f in m.store_fields}
    store.close()
    shutil.rmtree(dst / STORE_DIR)
    (dst / STORE_DIR).mkdir()
    for f, v in full.items():
        (dst / STORE_DIR / f"{f}.f16").write_bytes(v.astype("<f2").tobytes())
    m.version, m.image_fields, m.image_count, m.field_codecs, m.store_layout = 1, [], 0, {}, {}
    m.store_bytes_per_entity = sum(2 * int(np.prod(s)) for s in m.store_fields.values())
    m.save(dst)


def part_store(a: argparse.Namespace, threads: int) -> dict[str, Any]:
    work = Path(a.work)
    index = work / "demo-index"
    m = build(
        BuildConfig(
            kb=str(Path(a.data) / "kb.jsonl"),
            model=a.model,
            out=str(index),
            device="cpu",
            encoder_runtime="torch",  # the layout does not depend on it
        )
    )
    assert isinstance(m, Manifest)
    model = LinkingModel.from_pretrained(a.model).eval()
    fields = store_fields(model, True)
    images, _, sizes_chosen = store_layout(fields)
    v1 = sum(row_bytes(s, "f16") for s in fields.values())
    v2_f16_entity = 4 + sum(row_bytes(s, "f16") for f, s in fields.items() if f not in images)
    v2_f16_image = sum(row_bytes(fields[f], "f16") for f in images)
    share = (m.image_count - 1) / m.entity_count  # entities with an image
    layouts = {
        "v1 (every field float16, per entity)": (v1, 0),
        "v2, float16 (image fields per image record)": (v2_f16_entity, v2_f16_image),
        "v2, chosen codecs": (sizes_chosen["entity_bytes"], sizes_chosen["image_bytes"]),
    }
    table = {
        name: {
            "entity_with_image": e + i,
            "entity_without_image": e,
            "demo_world_average": round(e + i * share) if i else e,
        }
        for name, (e, i) in layouts.items()
    }
    folder_bytes = sum(p.stat().st_size for p in (index / STORE_DIR).rglob("*") if p.is_file())
    # the rerank as the server does it, store reads included, v1 folder + today's scoring vs
    # the v2 folder + the kernel
    v1_dir = work / "demo-index-v1"
    _downgrade_v1(index, v1_dir)
    fp = model.fingerprint()
    s2, s1 = IndexSearcher(index, fp), IndexSearcher(v1_dir, fp)
    # the server's CPU kernel over the float32 read, and over the records as stored (decoded
    # inside its graph: models.onnx_kernel, OnnxKernel.score_stored)
    onnx = load_kernel(
        model.matcher, "onnx", work / "onnx", threads, torch.device("cpu"), s2.record_codecs
    )
    assert isinstance(onnx, OnnxKernel)
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    reads = []
    for b, k in ((1, 100), (32, 100)):
        men = _feats(
            (b,),
            cfg.mimic.dt,
            cfg.mimic.dv,
            cfg.encoder.text_max_length,
            cfg.encoder.num_image_tokens,
            g,
        )
        rows = torch.randint(0, m.entity_count, (b, k), generator=g).numpy()

        def today(men: MimicFeatures = men, rows: np.ndarray = rows) -> Any:
            with torch.inference_mode():
                return model.matcher.score_precomputed(men, s1.records(rows))

        def new(men: MimicFeatures = men, rows: np.ndarray = rows) -> Any:
            with torch.inference_mode():
                return score_candidates(model.matcher, men, s2.records(rows))

        def read_v1(rows: np.ndarray = rows) -> Any:
            return s1.records(rows)

        def read_v2(rows: np.ndarray = rows) -> Any:
            return s2.records(rows)

        t = timed_alternating(
            {
                "v1 + score_precomputed": today,
                "v2 + kernel": new,
                "read v1": read_v1,
                "read v2": read_v2,
            },
            a.reps,
        )
        ms = {k_: 1e3 * med(v) for k_, v in t.items()}

        def read_numpy_f16(rows: np.ndarray) -> Any:
            # the read before half_to_float: numpy's float16 -> float32 conversion
            flat = rows.reshape(-1)
            fields = MimicEntityRecord.field_names()
            return [s1.store.stored_rows(f, flat)[0].astype(np.float32) for f in fields]

        def read_torch_f16(rows: np.ndarray) -> Any:
            flat = rows.reshape(-1)
            return [s1.store.rows(f, flat) for f in MimicEntityRecord.field_names()]

        def onnx_read(rows: np.ndarray, men: MimicFeatures = men) -> Any:
            return onnx(men, s2.records(rows), None)

        def onnx_stored(rows: np.ndarray, men: MimicFeatures = men) -> Any:
            stored = s2.stored_records(rows)
            assert stored is not None
            return onnx.score_stored(men, stored, None)

        # side by side in pairs: each rep reads fresh candidate rows (as requests do), the
        # same rows for both sides, each call after the same state: hot, or after a sweep of
        # 64 MB (what the encoders leave in the caches before a rerank)
        sets = [
            torch.randint(0, m.entity_count, (b, k), generator=g).numpy() for _ in range(a.reps * 4)
        ]
        pairs = {}
        for cond, before in (("hot", None), ("after a 64 MB sweep", sweep)):
            for name, fns in (
                (
                    "stored",
                    {"read + onnx kernel": onnx_read, "as stored + onnx kernel": onnx_stored},
                ),
                ("float16", {"numpy": read_numpy_f16, "torch": read_torch_f16}),
            ):
                tp = timed_pairs(fns, sets, before)
                pairs[f"{name}, {cond}"] = {n: 1e3 * med(v) for n, v in tp.items()}
        stored = s2.stored_records(rows)
        assert stored is not None
        same = onnx.score_stored(men, stored, None).score.equal(
            onnx(men, s2.records(rows), None).score
        )
        reads.append(
            {
                "B": b,
                "K": k,
                "ms": ms,
                "speedup": ms["v1 + score_precomputed"] / ms["v2 + kernel"],
                "pairs_ms": pairs,
                "stored_scores_bit_identical": bool(same),
            }
        )
    s1.close()
    s2.close()
    return {
        "entities": m.entity_count,
        "image_records": m.image_count,
        "image_fields": list(images),
        "codecs": dict(FIELD_CODECS),
        "manifest_store_bytes_per_entity": m.store_bytes_per_entity,
        "manifest_store_layout": m.store_layout,
        "store_folder_bytes_per_entity": folder_bytes / m.entity_count,
        "layouts": table,
        "rerank_with_reads": reads,
        "field_row_bytes": {f: row_bytes(s, FIELD_CODECS.get(f, "f16")) for f, s in fields.items()},
    }


# ---------------------------------------------------------------------- render
def render(res: dict[str, Any]) -> str:
    out = ["# Serving speed (bench/speed.py)", ""]
    if "encoders" in res:
        e = res["encoders"]
        out += [
            "## Encoder towers by runtime",
            "",
            f"{e['texts']} demo-world entity texts (40 tokens), {e['images']} demo-world "
            "images (224 x 224); median of the reps, variants alternating within each rep.",
            "",
            "| tower | batch | runtime | ms per call | items/s | vs torch |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(e["rows"], key=lambda r: (r["tower"], -r["batch"])):
            out.append(
                f"| {r['tower']} | {r['batch']} | {r['runtime']} | {1e3 * r['seconds']:.1f} | "
                f"{r['items_per_s']:.1f} | {r['speedup_vs_torch']:.2f}x |"
            )
        out += ["", _machine_line(e["machine"]), ""]
    if "surface" in res:
        su = res["surface"]
        toks = ", ".join(f"{w} {n}" for w, n in su["longest_tokens"].items())
        out += [
            "## The surface pass (names, mention strings) padded to the longest",
            "",
            "The fusion stage's name cosine encodes each entity name (index job) and each "
            "mention string (per request) alone. Padded to 40 tokens as the entity and mention "
            f"texts are, against padded to the batch's longest (tokens at batch 32: {toks}); "
            "median ms per call, alternating; the largest difference of the two vectors.",
            "",
            "| texts | batch | runtime | padded to 40 ms | to the longest ms | speed-up "
            "| max abs diff |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in su["rows"]:
            out.append(
                f"| {r['texts']} | {r['batch']} | {r['runtime']} | {r['padded_ms']:.2f} | "
                f"{r['longest_ms']:.2f} | {r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |"
            )
        out += ["", _machine_line(su["machine"]), ""]
    if "quality" in res:
        q = res["quality"]
        out += [
            "## Quality by encoder runtime (demo world, test split; model trained on torch "
            "features)",
            "",
            "| runtime | full-KB H@1 | full-KB MRR | two-stage H@1 | two-stage MRR | text cosine "
            "to torch (min / p01 / mean) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for rt, r in q["runtimes"].items():
            c = r.get("text_cosine_to_torch")
            cs = f"{c['min']:.4f} / {c['p01']:.4f} / {c['mean']:.4f}" if c else "1 (itself)"
            out.append(
                f"| {rt} | {100 * r['full_kb']['H@1']:.2f} | {100 * r['full_kb']['MRR']:.2f} | "
                f"{100 * r['two_stage_100']['H@1']:.2f} | "
                f"{100 * r['two_stage_100']['MRR']:.2f} | {cs} |"
            )
        out += [
            "",
            "Store codecs (torch features): float16 records against the chosen q8 fields "
            f"({', '.join(q['codecs']['chosen']['codecs'])}).",
            "",
            "| records | full-KB H@1 | full-KB MRR | two-stage H@1 | two-stage MRR |",
            "| --- | --- | --- | --- | --- |",
        ]
        for label in ("f16", "chosen"):
            r = q["codecs"][label]
            out.append(
                f"| {label} | {100 * r['full_kb']['H@1']:.2f} | {100 * r['full_kb']['MRR']:.2f} "
                f"| {100 * r['two_stage_100']['H@1']:.2f} | "
                f"{100 * r['two_stage_100']['MRR']:.2f} |"
            )
        sh = q["codecs"]["score_shift_q8_vs_f16"]
        out += [
            "",
            "Largest score change q8 vs float16 records over 200 mentions x 100 candidates: "
            + ", ".join(f"{k} {v:.4f}" for k, v in sh.items())
            + f" (largest |score| {q['codecs']['score_scale']:.1f}).",
            "",
            _machine_line(q["machine"]),
            "",
        ]
    if "kernel" in res:
        k = res["kernel"]
        out += [
            "## MIMIC over B x K candidates",
            "",
            f"L = {k['L']}, h = {k['h']}, dt = {k['dt']}; demo-world test mentions, their "
            "retrieved top K, the trained model. GEMM peak here: "
            f"{k['gemm_peak_gflops']:.1f} GFLOP/s (a "
            "1024^3 fp32 product). Floor = a pure square GEMM doing the kernel's matmul "
            "FLOPs; the attention GEMM alone is the (K L, h) x (h, L) product per mention.",
            "",
            "| B x K | released (entity side per request) ms | score_precomputed ms | kernel "
            "ms | floor GEMM ms | attention GEMM ms | kernel vs released | vs "
            "score_precomputed | kernel / floor | kernel, text-only KB ms |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in k["rows"]:
            ms = r["ms"]
            out.append(
                f"| {r['B']} x {r['K']} | {ms['released']:.2f} | {ms['precomputed']:.2f} | "
                f"{ms['kernel']:.3f} | {ms['floor_gemm']:.3f} | {ms['attention_gemm']:.3f} | "
                f"{r['kernel_vs_released']:.1f}x | {r['kernel_vs_precomputed']:.1f}x | "
                f"{r['kernel_vs_floor_gemm']:.2f} | {ms['kernel_text_only_kb']:.3f} |"
            )
        if all("onnx" in r["ms"] for r in k["rows"]):
            out += [
                "",
                "The kernel as one onnxruntime graph (`models/onnx_kernel.py`, the server's CPU "
                "default, `MEL_KERNEL_RUNTIME`), timed in the same alternating reps:",
                "",
                "| B x K | onnx kernel ms | vs released | vs torch kernel | onnx / floor | "
                "onnx, text-only KB ms | onnx - score_precomputed | onnx - float64 |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in k["rows"]:
                ms = r["ms"]
                out.append(
                    f"| {r['B']} x {r['K']} | {ms['onnx']:.3f} | {r['onnx_vs_released']:.1f}x | "
                    f"{r['onnx_vs_torch_kernel']:.2f}x | {r['onnx_vs_floor_gemm']:.2f} | "
                    f"{ms['onnx_text_only_kb']:.3f} | "
                    f"{r['max_abs_diff_onnx_vs_precomputed']:.1e} | "
                    f"{r['onnx_error_vs_float64']:.1e} |"
                )
        out += [
            "",
            "| B x K | imageless candidates | largest abs score | kernel - score_precomputed | "
            "kernel - float64 | score_precomputed - float64 | floor at the peak rate ms |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in k["rows"]:
            out.append(
                f"| {r['B']} x {r['K']} | {r['imageless_candidates']} | "
                f"{r['max_abs_score']:.1f} | {r['max_abs_diff_vs_precomputed']:.1e} | "
                f"{r['kernel_error_vs_float64']:.1e} | {r['precomputed_error_vs_float64']:.1e} | "
                f"{r['floor_ms_at_peak']:.2f} |"
            )
        out += ["", _machine_line(k["machine"]), ""]
    if "store" in res:
        s = res["store"]
        out += [
            "## Store bytes per entity (every reranker's parts: MIMIC, DRIN, the name vector)",
            "",
            f"Demo world: {s['entities']:,} entities, {s['image_records'] - 1:,} with an "
            f"image. q8 fields: {', '.join(s['codecs'])}.",
            "",
            "| layout | entity with an image | entity without | demo-world average |",
            "| --- | --- | --- | --- |",
        ]
        for name, r in s["layouts"].items():
            out.append(
                f"| {name} | {r['entity_with_image']:,} | {r['entity_without_image']:,} | "
                f"{r['demo_world_average']:,} |"
            )
        out += [
            "",
            f"The built demo index: manifest {s['manifest_store_bytes_per_entity']:,} "
            f"bytes/entity, store folder {s['store_folder_bytes_per_entity']:,.0f}.",
            "",
            "| B x K | read v1 ms | read v2 ms | v1 read + score_precomputed ms (today) | v2 "
            "read + kernel ms | speed-up |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in s["rerank_with_reads"]:
            ms = r["ms"]
            out.append(
                f"| {r['B']} x {r['K']} | {ms['read v1']:.2f} | {ms['read v2']:.2f} | "
                f"{ms['v1 + score_precomputed']:.2f} | {ms['v2 + kernel']:.2f} | "
                f"{r['speedup']:.1f}x |"
            )
        if all("pairs_ms" in r for r in s["rerank_with_reads"]):
            out += [
                "",
                "Side by side in pairs (each rep fresh random candidate rows, the same for both "
                "sides, the order alternating; hot, or each call after a 64 MB sweep of the "
                "caches, as after the encoders): the server's CPU kernel (the onnxruntime graph) "
                "over the float32 read against over the records as stored (the q8 and float16 "
                "codes gathered, decoded inside the graph: `OnnxKernel.score_stored`); and the "
                "float32 read of float16 fields (the v1 folder's MIMIC records, every field "
                "float16) converted by numpy against by torch (`index.store.half_to_float`, the "
                "read since then; exact).",
                "",
                "| B x K | caches | read + onnx kernel ms | as stored + onnx kernel ms | "
                "speed-up | float16 by numpy ms | by torch ms | speed-up |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in s["rerank_with_reads"]:
                for cond in ("hot", "after a 64 MB sweep"):
                    st, fh = r["pairs_ms"][f"stored, {cond}"], r["pairs_ms"][f"float16, {cond}"]
                    a_, b_ = st["read + onnx kernel"], st["as stored + onnx kernel"]
                    out.append(
                        f"| {r['B']} x {r['K']} | {cond} | {a_:.3f} | {b_:.3f} | {a_ / b_:.2f}x | "
                        f"{fh['numpy']:.3f} | {fh['torch']:.3f} | {fh['numpy'] / fh['torch']:.1f}x |"
                    )
            same = all(r["stored_scores_bit_identical"] for r in s["rerank_with_reads"])
            out += ["", f"Scores over stored records bit-identical to the float32 read's: {same}."]
        out += ["", _machine_line(s["machine"]), ""]
    return "\n".join(out) + "\n"


def _machine_line(m: dict[str, Any]) -> str:
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} intra-op threads); torch "
        f"{m['torch']}, onnxruntime {m['onnxruntime']}; commit {m['commit']}; {m['date']}; "
        f"load average {m.get('loadavg', '?')} (a shared machine)."
    )


PARTS = {
    "encoders": part_encoders,
    "surface": part_surface,
    "kernel": part_kernel,
    "quality": part_quality,
    "store": part_store,
}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", choices=list(PARTS))
    p.add_argument("--render", action="store_true", help="only rewrite the markdown")
    p.add_argument("--data", default="artifacts/demo-world")
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--work", default="artifacts/speed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    if a.part:
        threads = configure_threads(a.threads)
        t0 = time.perf_counter()
        part = PARTS[a.part](a, threads)
        part["wall_seconds"] = round(time.perf_counter() - t0, 1)
        part["machine"] = _machine.machine_info(
            ("torch", "onnxruntime"),
            threads=threads,
            reps=a.reps,
            # other jobs share this machine: the 1-minute load when the part ended
            loadavg=round(os.getloadavg()[0], 2),
        )
        res[a.part] = part
    elif not a.render:
        p.error("give --part or --render")
    print(_machine.write_results(out, res, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
