"""Encoder stage of the index job: a chunk's entities -> float16 store fields, one row each.

The model is loaded once per job and moved to the device here; images are decoded by a thread
pool, batches encoded (GPU when present) and turned into MIMIC's per-entity records
(``MimicMatcher.precompute_entities``) plus, optionally, DRIN's per-entity parts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data.schema import Entity, RecordReport
from models.drin_features import STORE_FIELDS as DRIN_FIELDS
from models.drin_features import entity_parts
from models.mimic import MimicEntityRecord
from models.model import LinkingModel
from models.preprocess import entity_text, load_image_or_none

NAME_FIELD = "name_text"  # (text_dim,) the backbone's global text feature of the name alone


class ChunkEncoder:
    """Decodes and encodes KB chunks into per-entity MIMIC records (and DRIN parts)."""

    def __init__(
        self,
        model: LinkingModel,
        image_root: Path,
        batch_size: int,
        workers: int,
        device: torch.device,
        drin_fields: bool = True,
    ) -> None:
        self.model = model.to(device).eval()
        self.drin_fields = drin_fields
        self.image_root = image_root
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.device = device

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _image(self, ent: Entity, report: RecordReport) -> Any:
        if not ent.images:
            return None
        path = self.image_root / ent.images[0]  # the evaluation rule: an entity's first image
        return load_image_or_none(
            path,
            on_error=lambda p, why: report.add(
                "entity.unreadable_image", f"id={ent.id} {p}: {why}"
            ),
        )

    @torch.inference_mode()
    def encode(self, entities: list[Entity], report: RecordReport) -> dict[str, np.ndarray]:
        """float16 store fields (MIMIC records, DRIN parts), one row per entity."""
        parts: dict[str, list[torch.Tensor]] = {}
        encoder = self.model.encoder
        for s in range(0, len(entities), self.batch_size):
            batch = entities[s : s + self.batch_size]
            images = list(self.pool.map(lambda e: self._image(e, report), batch))
            text = encoder.text_features([entity_text(e.name, e.attributes) for e in batch])
            image = encoder.image_features(images)
            rec = self.model.matcher.precompute_entities(encoder.project(text, image))
            fields = {f: getattr(rec, f) for f in MimicEntityRecord.field_names()}
            # the name alone through the text encoder: the fusion stage's zero-shot
            # mention-vs-name cosine (the mention side is encoded the same way per request)
            fields[NAME_FIELD] = encoder.text_features([e.name for e in batch]).global_
            if self.drin_fields:
                has = torch.tensor([im is not None for im in images], device=text.global_.device)
                fields.update(entity_parts(encoder.backbone, text, image, has).to_store())
            for f, t in fields.items():
                parts.setdefault(f, []).append(t)
        return {f: torch.cat(ts).float().cpu().numpy().astype("<f2") for f, ts in parts.items()}


def store_fields(model: LinkingModel, drin_fields: bool) -> dict[str, list[int]]:
    """Per-entity shape of each field :meth:`ChunkEncoder.encode` produces, in store order."""
    cfg = model.config.mimic
    L = model.config.encoder.text_max_length
    d = {
        "text_cls": [cfg.dt],
        "tglu_cls": [cfg.tglu_hidden_dim],
        "tglu_query": [L, cfg.tglu_hidden_dim],
        "e2m_query": [cfg.idlu_hidden_dim],
        "m2e_key": [cfg.idlu_hidden_dim],
        "m2e_pooled": [cfg.idlu_hidden_dim],
        "cmfu": [cfg.cmfu_hidden_dim],
    }
    assert list(d) == list(MimicEntityRecord.field_names())
    d[NAME_FIELD] = [model.config.encoder.text_dim]
    if drin_fields:
        enc = model.config.encoder
        d.update(
            zip(
                DRIN_FIELDS,
                ([enc.text_dim], [enc.image_global_dim], [enc.image_token_dim], [1]),
                strict=True,
            )
        )
    return d


def has_drin_fields(fields: dict[str, list[int]]) -> bool:
    """Whether a store with these fields holds DRIN's entity parts."""
    return all(f in fields for f in DRIN_FIELDS)


__all__ = ["NAME_FIELD", "ChunkEncoder", "has_drin_fields", "store_fields"]
