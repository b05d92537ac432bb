"""DRIN vs MIMIC vs retrieval-only on the demo world, over the same retrieved top-K, broken
down by what the demo world says resolves each mention (``truth_mentions.jsonl``).

    python bench/drin_quality.py --data artifacts/demo-world --model artifacts/demo-model/best \\
        --drin artifacts/demo-drin/best --out bench/results/drin-quality.json

The breakdown shows where each reranker gains or loses: ``unambiguous`` (one KB entity has the
name), ``text_resolves`` (the sentence's context picks the entity), ``image_resolves`` (only
the image does), ``unresolvable``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import torch

from models.data.schema import load_dataset
from models.drin_features import DrinReranker
from models.drin_train import (
    DrinData,
    candidate_metrics,
    candidate_ranks,
    drin_scores,
    mimic_scores,
)
from models.features import dataset_features
from models.model import LinkingModel


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="artifacts/demo-world")
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--drin", default="artifacts/demo-drin/best")
    p.add_argument("--split", default="test")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--cache-dir", default="artifacts/cache")
    p.add_argument("--out", default="bench/results/drin-quality.json")
    a = p.parse_args()
    t0 = time.perf_counter()
    ds = load_dataset(a.data)
    model = LinkingModel.from_pretrained(a.model)
    drin = DrinReranker.from_pretrained(a.drin)
    data = DrinData(model, ds, dataset_features(model.encoder, ds, a.cache_dir))
    split = data.split(a.split, a.candidates)
    truth_file = Path(a.data) / "truth_mentions.jsonl"
    kinds = {}
    if truth_file.is_file():
        for line in truth_file.read_text().splitlines():
            t = json.loads(line)
            kinds[t["id"]] = t["kind"]
    kind = [kinds.get(m.id, "all") for m in split.mentions]
    scores = {
        "retrieval": split.retrieval,
        "MIMIC": mimic_scores(data, split),
        "DRIN": drin_scores(drin, data, split)[0],
    }
    ranks = {k: candidate_ranks(s, split.candidates, split.gold) for k, s in scores.items()}
    groups = ["all", *sorted(set(kind) - {"all"})]
    table: dict[str, dict[str, Any]] = {}
    for g in groups:
        sel = torch.tensor([g == "all" or k == g for k in kind])
        table[g] = {
            "mentions": int(sel.sum()),
            **{
                name: candidate_metrics(r[sel], a.candidates)
                for name, r in ranks.items()
                if int(sel.sum())
            },
        }
    res = {
        "what": f"{a.split} split, each mention's retrieved top-{a.candidates}, gold never "
        "inserted (a gold outside the list is a miss)",
        "machine": _machine.machine_info(),
        "model": a.model,
        "drin": a.drin,
        "drin_epoch": drin.meta.get("epoch"),
        "kinds": dict(Counter(kind)),
        "table": table,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(_machine.write_results(Path(a.out), res, render))
    return 0


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# DRIN vs MIMIC vs retrieval-only on the demo world, by what resolves a mention",
        "",
        f"{res['what']}. Commit {m['commit']}, {m['cpu']}, {m['date']}.",
        "",
        "| mentions | n | retrieval Top-1 | MIMIC Top-1 | DRIN Top-1 | DRIN Top-5 | DRIN MRR |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g, row in res["table"].items():
        if row["mentions"] == 0:
            continue
        r, mi, d = row["retrieval"], row["MIMIC"], row["DRIN"]
        lines.append(
            f"| {g} | {row['mentions']} | {100 * r['Top-1']:.2f} | {100 * mi['Top-1']:.2f} | "
            f"{100 * d['Top-1']:.2f} | {100 * d['Top-5']:.2f} | {100 * d['MRR']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
