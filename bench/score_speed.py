"""Full-KB MIMIC scoring speed: the per-pair path vs the GEMM path (models/evaluate.py).

    python bench/score_speed.py --data artifacts/wikimel [--model artifacts/.../best]

Scores test mentions of a dataset against EVERY KB entity, from the cached raw features
(models/features.py; encoded first if absent), with

* ``per-pair``: ``MimicMatcher.score_precomputed`` on chunks of PAIR_BUDGET / (B L^2) entities
  (the previous ``models.evaluate.score_all``: one (L, h) x (h, L) product per pair);
* ``gemm``: ``models.evaluate.score_block`` (one (n L, h) x (h, B L) product per entity chunk),
  for a few mention batch sizes and block sizes;

and reports pairs/s (median of ``--reps``), the max |difference| between the two paths, and the
projected time for the whole test split. Speed does not depend on the weights: without
``--model`` a fresh default model (random MIMIC heads, seed 0) is used. Writes
``bench/results/score-speed.json`` + ``.md``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import numpy as np
import torch

from models.data.schema import load_dataset
from models.evaluate import BLOCK_ELEMENTS, PAIR_BUDGET, entity_records, score_block
from models.features import dataset_features
from models.mimic import MimicEntityRecord, MimicFeatures
from models.model import LinkingModel

logger = logging.getLogger("score_speed")


@torch.inference_mode()
def per_pair(model: LinkingModel, m: MimicFeatures, records: MimicEntityRecord) -> torch.Tensor:
    """The previous score_all inner loop (per-pair batched matmuls, PAIR_BUDGET chunks)."""
    n = records.text_cls.shape[0]
    L = records.tglu_query.shape[-2]
    out = torch.empty(len(m), n)
    chunk = max(1, PAIR_BUDGET // (len(m) * L * L))
    for c in range(0, n, chunk):
        rec = records.map(lambda t, c=c: t[c : c + chunk])
        out[:, c : c + chunk] = model.matcher.score_precomputed(m, rec).score
    return out


@torch.inference_mode()
def gemm(
    model: LinkingModel, m: MimicFeatures, records: MimicEntityRecord, block: int
) -> torch.Tensor:
    return score_block(model.matcher, m, records, block_elements=block).score


def timed(fn: Any, reps: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    assert out is not None
    return statistics.median(times), out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="artifacts/wikimel")
    p.add_argument("--model", help="checkpoint (default: fresh default model, seed 0)")
    p.add_argument("--cache-dir", default="artifacts/cache")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench/results/score-speed.json")
    a = p.parse_args()
    model = LinkingModel.from_pretrained(a.model) if a.model else LinkingModel.default(0)
    model.eval()
    ds = load_dataset(a.data)
    feats = dataset_features(model.encoder, ds, a.cache_dir)
    records = entity_records(model, feats.entities)
    n = records.text_cls.shape[0]
    test = [m for m in ds.split("test") if m.entity_id is not None]
    rows = feats.mention_rows(test)

    def mentions(b: int) -> MimicFeatures:
        r = rows[:b]
        text, image = feats.mentions.gather(r, feats.mentions.first_image_rows(r))
        with torch.inference_mode():
            return model.encoder.project(text, image)

    res_rows: list[dict[str, Any]] = []
    m32 = mentions(32)
    secs, ref = timed(lambda: per_pair(model, m32, records), 1)  # 10-30 s: one rep
    res_rows.append(
        {
            "path": "per-pair (previous score_all)",
            "batch": 32,
            "block": PAIR_BUDGET,
            "seconds": secs,
            "pairs_per_s": 32 * n / secs,
            "max_abs_diff": 0.0,
            "max_abs_score": float(ref.abs().max()),
        }
    )
    logger.info("per-pair: %.0f pairs/s", 32 * n / secs)
    for b in (32, 128):
        mb = mentions(b)
        for block in (1 << 20, BLOCK_ELEMENTS, 1 << 24):
            secs, out = timed(lambda mb=mb, block=block: gemm(model, mb, records, block), a.reps)
            diff = float((out[:32] - ref).abs().max())
            res_rows.append(
                {
                    "path": "gemm (score_block)",
                    "batch": b,
                    "block": block,
                    "seconds": secs,
                    "pairs_per_s": b * n / secs,
                    "max_abs_diff": diff,
                }
            )
            logger.info("gemm B=%d block=%d: %.0f pairs/s, diff %.2e", b, block, b * n / secs, diff)
    base = res_rows[0]["pairs_per_s"]
    for r in res_rows:
        r["speedup"] = r["pairs_per_s"] / base
    default = max(
        (r for r in res_rows if r["block"] == BLOCK_ELEMENTS and r["batch"] == 32),
        key=lambda r: r["pairs_per_s"],
    )
    out = {
        "data": str(a.data),
        "entities": n,
        "test_mentions": len(test),
        "text_tokens": int(records.tglu_query.shape[-2]),
        "hidden": int(records.tglu_query.shape[-1]),
        "rows": res_rows,
        "test_split_seconds_projected": {
            "per-pair": len(test) * n / base,
            "gemm (defaults)": len(test) * n / default["pairs_per_s"],
        },
        "machine": _machine.machine_info(("torch",), torch_threads=torch.get_num_threads()),
    }
    print(_machine.write_results(Path(a.out), out, table))
    return 0


def table(out: dict[str, Any]) -> str:
    lines = [
        f"Full-KB MIMIC scoring, {out['entities']:,} entities x WikiMEL test mentions "
        f"(L = {out['text_tokens']}, h = {out['hidden']}); median of the reps.",
        "",
        "| path | mentions per call | block elements | s per call | pairs/s | speedup | "
        "max abs diff vs per-pair |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['path']} | {r['batch']} | {r['block']:,} | {r['seconds']:.2f} | "
            f"{r['pairs_per_s']:,.0f} | {r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |"
        )
    proj = out["test_split_seconds_projected"]
    mach = out["machine"]
    lines += [
        "",
        f"Largest |score| of the reference block: {out['rows'][0]['max_abs_score']:.1f} "
        f"(float32 spacing there: {float(np.spacing(np.float32(out['rows'][0]['max_abs_score']))):.1e}).",
        "",
        f"Whole test split ({out['test_mentions']:,} mentions): per-pair {proj['per-pair']:.0f} s, "
        f"gemm {proj['gemm (defaults)']:.0f} s (projected from the rows above).",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores (torch {mach['torch_threads']} threads); "
        f"torch {mach['torch']}; commit {mach['commit']}; {mach['date']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
