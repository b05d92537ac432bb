"""Encoder stage of the index job: a chunk's entities -> float16 store fields, one row each.

The model is loaded once per job and moved to the device here; images are decoded by a thread
pool, batches encoded (GPU when present) and turned into MIMIC's per-entity records
(``MimicMatcher.precompute_entities``) plus, optionally, DRIN's per-entity parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from index.writer import BLANK_PREFIX, HAS_IMAGE
from models.data.schema import Entity, RecordReport
from models.drin_features import STORE_FIELDS as DRIN_FIELDS
from models.drin_features import entity_parts
from models.encoders import ImageFeatures, TextFeatures
from models.mimic import MimicEntityRecord
from models.model import LinkingModel
from models.preprocess import entity_text, load_image_or_none

if TYPE_CHECKING:  # the training cache's table; serving (service.kb) never loads that module
    from models.features import FeatureTable

NAME_FIELD = "name_text"  # (text_dim,) the backbone's global text feature of the name alone
# Fields that depend on the entity's image alone (VDLU's entity side, DRIN's image parts):
# the store keeps them once per image record, and every entity without an image shares the
# one "no image" record (index/store.py, store/image/).
IMAGE_FIELDS = ("e2m_query", "m2e_key", "m2e_pooled", *DRIN_FIELDS[1:])


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
        cache: tuple[FeatureTable, dict[str, int]] | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        # (table, id -> row) of the KB's raw backbone features from the training cache: the
        # same frozen backbone already encoded them (models.features.cached_entity_features)
        self.cache = cache
        self.from_cache = 0
        self.drin_fields = drin_fields
        self.image_root = image_root
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.device = device
        self._blank: dict[str, np.ndarray] | None = None

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

    def _fields(self, texts: list[str], names: list[str], images: list[Any]) -> dict[str, Any]:
        encoder = self.model.encoder
        text = encoder.text_features(texts)
        image = encoder.image_features(images)
        has = torch.tensor([im is not None for im in images], device=text.global_.device)
        return project_fields(self.model, text, image, has, names, self.drin_fields)

    def blank(self) -> dict[str, np.ndarray]:
        """The "no image" record of the image fields, (1, ...) float16 each: what every
        entity without an image has there (computed once, by this job's encoder)."""
        if self._blank is None:
            with torch.inference_mode():
                fields = self._fields([entity_text("", "")], [""], [None])
            self._blank = {
                f: fields[f].float().cpu().numpy().astype("<f2")
                for f in IMAGE_FIELDS
                if f in fields
            }
        return self._blank

    @torch.inference_mode()
    def encode(self, entities: list[Entity], report: RecordReport) -> dict[str, np.ndarray]:
        """float16 store fields (MIMIC records, DRIN parts), one row per entity; plus
        ``has_image`` (bool per entity) and ``blank.<field>`` (the no-image record)."""
        parts: dict[str, list[torch.Tensor]] = {}
        has_image: list[bool] = []
        for s in range(0, len(entities), self.batch_size):
            batch = entities[s : s + self.batch_size]
            cached = self._cached(batch)
            if cached is not None:  # the training cache's backbone features
                text, image, has_t = cached
                has_image += has_t.tolist()
                fields = project_fields(
                    self.model, text, image, has_t, [e.name for e in batch], self.drin_fields
                )
                self.from_cache += len(batch)
            else:
                images = list(self.pool.map(lambda e: self._image(e, report), batch))
                has_image += [im is not None for im in images]
                fields = self._fields(
                    [entity_text(e.name, e.attributes) for e in batch],
                    [e.name for e in batch],
                    images,
                )
            for f, t in fields.items():
                parts.setdefault(f, []).append(t)
        out = {f: torch.cat(ts).float().cpu().numpy().astype("<f2") for f, ts in parts.items()}
        has = np.array(has_image, dtype=bool)
        for f, v in self.blank().items():
            if f in out:  # (a chunk without valid entities has no rows)
                # the very record the store shares (a batch of one rounds a last bit apart)
                out[f][~has] = v
            out[BLANK_PREFIX + f] = v
        out[HAS_IMAGE] = has
        return out

    def _cached(
        self, batch: list[Entity]
    ) -> tuple[TextFeatures, ImageFeatures, torch.Tensor] | None:
        """The batch's cached text and first-image features (the evaluation rule, as
        :meth:`_image`), or None unless every entity is in the cache."""
        if self.cache is None:
            return None
        table, row_of = self.cache
        if any(e.id not in row_of for e in batch):
            return None
        rows = torch.tensor([row_of[e.id] for e in batch], dtype=torch.long)
        image_rows = table.first_image_rows(rows)
        text, image = table.gather(rows, image_rows)
        dev = self.device
        return (
            TextFeatures(text.global_.to(dev), text.tokens.to(dev)),
            ImageFeatures(image.global_.to(dev), image.tokens.to(dev)),
            (image_rows > 0).to(dev),
        )


def project_fields(
    model: LinkingModel,
    text: TextFeatures,
    image: ImageFeatures,
    has_image: torch.Tensor,
    names: list[str],
    drin_fields: bool,
) -> dict[str, torch.Tensor]:
    """Store fields (tensors) from the backbone's raw features of a batch of entities."""
    encoder = model.encoder
    rec = model.matcher.precompute_entities(encoder.project(text, image))
    fields = {f: getattr(rec, f) for f in MimicEntityRecord.field_names()}
    # the name alone through the text encoder: the fusion stage's zero-shot
    # mention-vs-name cosine (the mention side is encoded the same way per request)
    fields[NAME_FIELD] = encoder.surface_features(names)
    if drin_fields:
        fields.update(entity_parts(encoder.backbone, text, image, has_image).to_store())
    return fields


@torch.inference_mode()
def encode_entities(
    model: LinkingModel,
    entities: Sequence[Entity],
    images: Sequence[Image.Image | None],
    drin_fields: bool,
) -> dict[str, np.ndarray]:
    """float16 store fields, every one per entity, of one batch of entities with their decoded
    first images (None = the no-image rule): what a live update appends (index/live.py)."""
    encoder = model.encoder
    text = encoder.text_features([entity_text(e.name, e.attributes) for e in entities])
    image = encoder.image_features(list(images))
    has = torch.tensor([im is not None for im in images], device=text.global_.device)
    fields = project_fields(model, text, image, has, [e.name for e in entities], drin_fields)
    return {f: t.float().cpu().numpy().astype("<f2") for f, t in fields.items()}


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


# Each field's store codec (index/store.py): f16 unless listed here. Chosen by measurement
# (bench/speed.py, README "The store"): q8 only where the store-vs-direct equality tests
# (tests/test_index.py) and the demo world's H@1 are unchanged.
FIELD_CODECS: dict[str, str] = {"tglu_query": "q8", "drin_image": "q8", "drin_region": "q8"}


def store_layout(
    fields: dict[str, list[int]],
) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """The v2 layout of a store with these fields: (image fields, codecs, bytes per entity and
    per image record)."""
    from index.store import row_bytes

    images = [f for f in fields if f in IMAGE_FIELDS]
    codecs = {f: FIELD_CODECS[f] for f in fields if f in FIELD_CODECS}
    entity_bytes = 4 + sum(  # + the int32 image row
        row_bytes(s, codecs.get(f, "f16")) for f, s in fields.items() if f not in images
    )
    image_bytes = sum(row_bytes(fields[f], codecs.get(f, "f16")) for f in images)
    return images, codecs, {"entity_bytes": entity_bytes, "image_bytes": image_bytes}


def has_drin_fields(fields: dict[str, list[int]]) -> bool:
    """Whether a store with these fields holds DRIN's entity parts."""
    return all(f in fields for f in DRIN_FIELDS)


__all__ = [
    "FIELD_CODECS",
    "IMAGE_FIELDS",
    "NAME_FIELD",
    "ChunkEncoder",
    "encode_entities",
    "has_drin_fields",
    "project_fields",
    "store_fields",
    "store_layout",
]
