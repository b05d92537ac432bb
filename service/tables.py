"""``mel-candidates``: a dataset split through the serving path, up to the fusion stage.

    mel-candidates --data artifacts/demo-world --split train --model artifacts/demo-model/best \
                   --index artifacts/demo-index --out artifacts/fusion/tables/train

Every mention of the split is encoded, retrieved (dense top ``--candidates`` plus the lexical
channel's top ``--lexical``) and scored by MIMIC (and DRIN with ``--drin``) by the very code
the server runs (:class:`~service.linker.Linker`, :func:`~service.rerankers.fusion_signals`),
and written as a :class:`~models.fusion.CandidateTable`: what ``mel-train-fusion`` learns
from, so the fusion model sees at training time exactly the signals it gets when serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.data.schema import MelDataset, Mention, load_dataset
from models.fusion import (
    ZERO_SHOT,
    ZERO_SHOT_SOURCES,
    CandidateSignals,
    CandidateTable,
    MentionText,
)
from models.preprocess import load_image_or_none
from service.linker import Linker
from service.primitives import MentionBatch, MentionInput
from service.rerankers import (
    CandidateInfoReader,
    DrinGraphReranker,
    MimicReranker,
    fusion_signals,
)
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)


def _cat(parts: list[CandidateSignals]) -> CandidateSignals:
    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    drin = [p.drin for p in parts]
    return CandidateSignals(
        rows=cat("rows"),
        dense=cat("dense"),
        from_dense=cat("from_dense"),
        from_lexical=cat("from_lexical"),
        lexical=cat("lexical"),
        mimic=cat("mimic"),
        drin=np.concatenate(drin) if all(d is not None for d in drin) else None,  # type: ignore[arg-type]
        name_cos=cat("name_cos"),
        info=[line for p in parts for line in p.info],
    )


def dataset_inputs(ds: MelDataset, mentions: Sequence[Mention]) -> tuple[MentionInput, ...]:
    """Dataset mentions as the server receives them (images decoded, spans kept)."""
    return tuple(
        MentionInput(
            m.mention,
            m.sentence,
            load_image_or_none(ds.resolve(m.image)) if m.image else None,
            span=m.span,
        )
        for m in mentions
    )


def table_meta(
    linker: Linker, candidates: int, lexical: int, zero_shot: str = ZERO_SHOT
) -> dict[str, object]:
    """What a folder of tables was built with (its ``meta.json``; ``mel-train-fusion`` copies
    the fingerprints, the lexical k and the zero-shot source into the model it trains)."""
    return {
        "mimic_fingerprint": linker.fingerprint,
        "drin_fingerprint": linker.drin_fingerprint,
        "index_version": linker.index_version,
        "candidates": candidates,
        "lexical": lexical if linker.searcher.has_lexical else 0,
        "zero_shot": zero_shot,  # where name_cos's mention vector comes from
    }


@torch.inference_mode()
def build_table(
    linker: Linker,
    ds: MelDataset,
    split: str,
    candidates: int = 100,
    lexical: int = 20,
    batch_size: int = 32,
    progress: bool = True,
    zero_shot: str = ZERO_SHOT,
) -> CandidateTable:
    """The split's mentions (NIL ones included) with their candidate signals; the zero-shot
    cosine's mention vector from ``zero_shot`` (``models.fusion.ZERO_SHOT_SOURCES``)."""
    if zero_shot not in ZERO_SHOT_SOURCES:
        raise ValueError(f"zero_shot must be one of {ZERO_SHOT_SOURCES}, got {zero_shot!r}")
    mentions = ds.split(split)
    mimic = linker.rerankers["mimic"]
    drin = linker.rerankers.get("drin")
    assert isinstance(mimic, MimicReranker)
    assert drin is None or isinstance(drin, DrinGraphReranker)
    parts: list[CandidateSignals] = []
    info = CandidateInfoReader(linker.searcher)
    steps = range(0, len(mentions), batch_size)
    for s in tqdm(steps, desc=f"{split} candidates", disable=not progress):
        chunk = mentions[s : s + batch_size]
        items = dataset_inputs(ds, chunk)
        encoded = linker.encode(items)
        # the fusion stage's input, from the source asked for (whatever a loaded model reads)
        vectors = linker.zero_shot_vectors(items, encoded.mimic.text_tokens, zero_shot)
        encoded = replace(encoded, surface=vectors)
        batch = MentionBatch(items, encoded)
        dense = linker.retrieve(encoded, candidates)
        merged = linker.merge_lexical(batch, dense, lexical)
        parts.append(fusion_signals(batch, merged, linker.searcher, mimic, drin, info))
    return CandidateTable(
        ids=[m.id for m in mentions],
        mentions=[MentionText(m.mention, m.sentence, m.span) for m in mentions],
        gold=[m.entity_id for m in mentions],
        signals=_cat(parts),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mel-candidates", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", required=True, help="canonical dataset folder")
    p.add_argument("--split", nargs="+", default=["train", "dev", "test"])
    p.add_argument("--model", required=True, help="MIMIC checkpoint folder")
    p.add_argument("--index", required=True, help="index folder (mel-index build)")
    p.add_argument("--drin", help="DRIN checkpoint: also record DRIN's scores")
    p.add_argument("--candidates", type=int, default=100, help="dense top-k")
    p.add_argument("--lexical", type=int, default=20, help="lexical candidates merged in")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--zero-shot",
        choices=ZERO_SHOT_SOURCES,
        default=ZERO_SHOT,
        help="the mention's vector of the zero-shot name cosine: mention_pass = the leading "
        "mention tokens of the mention-text pass (no extra encoder call when served); surface "
        "= the mention string encoded alone (one more encoder call per request)",
    )
    p.add_argument("--out", required=True, help="folder: one table per split under it")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    linker = Linker(
        ServiceSettings(
            model_path=a.model,
            index_path=a.index,
            drin_model_path=a.drin,
            device="auto",
            use_faiss_gpu=False,
        )
    )
    ds = load_dataset(a.data)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data": str(a.data), **table_meta(linker, a.candidates, a.lexical, a.zero_shot)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    for split in a.split:
        t0 = time.perf_counter()
        table = build_table(
            linker, ds, split, a.candidates, a.lexical, a.batch_size, zero_shot=a.zero_shot
        )
        table.save(out / split)
        found = table.gold_positions() >= 0
        with_gold = sum(g is not None for g in table.gold)
        logger.info(
            "%s: %d mentions, gold in the list for %d of %d with a gold, %.0f s",
            split,
            len(table),
            int(found.sum()),
            with_gold,
            time.perf_counter() - t0,
        )
    linker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_table", "dataset_inputs", "main", "table_meta"]
