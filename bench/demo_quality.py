"""Demo-world quality: the default model vs its text-only and image-only ablations.

    python bench/demo_quality.py --data artifacts/demo-world --model artifacts/demo-model \\
        --out bench/results/demo-quality.json

Trains the ablations with the same recipe (frozen backbone, same features cache) unless their
folders exist, evaluates every model on the test split with full-KB ranking, adds the
evaluation-time unit drops of the full model, and writes JSON + a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import torch

from models.data.schema import load_dataset
from models.evaluate import PAIR_BUDGET, entity_records
from models.features import dataset_features
from models.metrics import gold_ranks, ranking_metrics
from models.model import LinkingModel
from models.train import TrainConfig, train

ROWS = [  # (label, model folder suffix, units trained, units dropped at evaluation)
    ("MIMIC (TGLU+VDLU+CMFU)", "", None, ()),
    ("text only: TGLU (trained alone)", "-text-only", ("tglu",), ()),
    ("image only: VDLU (trained alone)", "-image-only", ("vdlu",), ()),
    ("full model, w/o TGLU at eval", "", None, ("tglu",)),
    ("full model, w/o VDLU at eval", "", None, ("vdlu",)),
    ("full model, w/o CMFU at eval", "", None, ("cmfu",)),
]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="artifacts/demo-world")
    p.add_argument("--model", default="artifacts/demo-model", help="the full model's train dir")
    p.add_argument("--out", default="bench/results/demo-quality.json")
    p.add_argument("--epochs", type=int, default=8, help="the demo recipe (make demo-model)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cache-dir", default="artifacts/cache")
    a = p.parse_args()
    t0 = time.perf_counter()
    ds = load_dataset(a.data)
    for _, suffix, units, _ in ROWS:
        folder = Path(a.model + suffix)
        if units and not (folder / "best" / "config.json").is_file():
            train(
                TrainConfig(
                    data=a.data,
                    out=str(folder),
                    units=units,
                    lr=a.lr,
                    epochs=a.epochs,
                    cache_dir=a.cache_dir,
                )
            )
    rows: list[dict[str, Any]] = []
    feats = None
    unit_cache: dict[str, dict[str, torch.Tensor]] = {}
    test = [m for m in ds.split("test") if m.entity_id is not None]
    gold = torch.tensor([ds.entity_row[m.entity_id] for m in test if m.entity_id])
    for label, suffix, _, drop in ROWS:
        model = LinkingModel.from_pretrained(Path(a.model + suffix) / "best")
        if feats is None:  # the backbone is shared: one feature cache for every row
            feats = dataset_features(model.encoder, ds, a.cache_dir)
        if suffix not in unit_cache:  # one full-KB pass per model; unit drops reuse it
            unit_cache[suffix] = unit_scores(model, feats, feats.mention_rows(test))
        units = tuple(u for u in model.config.mimic.units if u not in drop)
        combined = sum(unit_cache[suffix][u] for u in units) / len(units)
        assert isinstance(combined, torch.Tensor)
        m = ranking_metrics(gold_ranks(combined, gold))
        rows.append({"model": label, "units": list(units), "dev": model.meta.get("val"), "test": m})
        print(f"{label}: test H@1={100 * m['H@1']:.2f} MRR={100 * m['MRR']:.2f}", flush=True)
    out = {
        "dataset": ds.summary(),
        "rows": rows,
        "machine": _machine.machine_info(("torch",)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    _machine.write_results(Path(a.out), out, table)
    print(table(out))
    return 0


@torch.inference_mode()
def unit_scores(model: LinkingModel, feats: Any, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """(mentions, N) score matrices of each unit against the whole KB, in one pass."""
    records = entity_records(model, feats.entities)
    out: dict[str, list[torch.Tensor]] = {u: [] for u in ("tglu", "vdlu", "cmfu")}
    L = records.tglu_query.shape[-2]
    n = records.text_cls.shape[0]
    for s in range(0, len(rows), 32):
        r = rows[s : s + 32]
        text, image = feats.mentions.gather(r, feats.mentions.first_image_rows(r))
        m = model.encoder.project(text, image)
        step = max(1, PAIR_BUDGET // (len(r) * L * L))
        parts: dict[str, list[torch.Tensor]] = {u: [] for u in out}
        for c in range(0, n, step):
            sc = model.matcher.score_precomputed(
                m, records.map(lambda t, c=c, step=step: t[c : c + step])
            )
            for u in out:
                parts[u].append(getattr(sc, u))
        for u in out:
            out[u].append(torch.cat(parts[u], dim=1))
    return {u: torch.cat(v) for u, v in out.items()}


def table(out: dict[str, Any]) -> str:
    lines = [
        "| model (demo world, test split, full-KB ranking) | H@1 | H@3 | H@5 | H@10 | MRR | MR |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in out["rows"]:
        m = r["test"]
        lines.append(
            f"| {r['model']} | {100 * m['H@1']:.2f} | {100 * m['H@3']:.2f} | "
            f"{100 * m['H@5']:.2f} | {100 * m['H@10']:.2f} | {100 * m['MRR']:.2f} | "
            f"{m['MR']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
