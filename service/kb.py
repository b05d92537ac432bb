"""Live knowledge-base updates through the serving model: add, replace and delete entities.

An update is encoded by the loaded model exactly as the index job encodes a KB line
(:func:`index.encode.encode_entities`), committed as one durable segment of the index folder
(:mod:`index.live`) and applied to the running searcher before it is acknowledged, so the next
request sees it and a restart keeps it. Runs on the model thread (the batcher's), so updates and
link batches never interleave.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from index.encode import encode_entities, has_drin_fields
from index.live import LiveSearcher, folder_lock, save_upload, write_segment
from models.data.schema import Entity
from models.mimic import MimicEntityRecord
from models.model import LinkingModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewEntity:
    """An entity to add or replace, with its image (decoded, and the bytes to keep)."""

    entity: Entity
    image: Image.Image | None = None
    image_bytes: bytes | None = None
    image_format: str | None = None


@dataclass(frozen=True)
class UpdateResult:
    added: tuple[str, ...]
    replaced: tuple[str, ...]
    deleted: tuple[str, ...]
    entities: int
    index_version: str


class EntitiesNotFound(KeyError):
    """A delete of ids the index does not hold (nothing was written)."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(", ".join(ids))
        self.ids = ids


class LiveKb:
    """Writes updates to one served index folder (a :class:`~index.live.LiveSearcher`)."""

    def __init__(self, model: LinkingModel, searcher: LiveSearcher, lock_timeout_s: float) -> None:
        self.model, self.searcher, self.lock_timeout_s = model, searcher, lock_timeout_s
        self.folder: Path = searcher.folder

    @torch.inference_mode()
    def _keys(self, fields: dict[str, np.ndarray]) -> np.ndarray:
        """Retrieval vectors from the float16 records, as the index job derives them."""
        rec = MimicEntityRecord(
            *(torch.from_numpy(fields[f]).float() for f in MimicEntityRecord.field_names())
        )
        return self.model.matcher.retrieval_keys(rec).float().numpy()

    def upsert(self, items: list[NewEntity]) -> UpdateResult:
        """Add the entities, replacing any with the same id (their old rows become
        tombstones). The images are stored under ``<index>/uploads/`` first."""
        m = self.searcher.manifest
        with folder_lock(self.folder, self.lock_timeout_s):
            self.searcher.refresh()  # another writer's segments come first
            entities = []
            for it in items:
                e = it.entity
                if it.image_bytes is not None and it.image_format is not None:
                    path = save_upload(self.folder, it.image_bytes, it.image_format)
                    e = Entity(e.id, e.name, e.attributes, (path,), e.aliases, e.popularity)
                entities.append(e)
            fields = encode_entities(
                self.model,
                entities,
                [it.image for it in items],
                has_drin_fields(m.store_fields),
            )
            fields = {f: fields[f] for f in m.store_fields}
            replaced = tuple(e.id for e in entities if self.searcher.row_of(e.id) is not None)
            write_segment(
                self.folder,
                self.searcher.base_version,
                m.model_fingerprint,
                [e.to_json() for e in entities],
                fields,
                self._keys(fields),
                [],
            )
            self.searcher.refresh()
        added = tuple(e.id for e in entities if e.id not in replaced)
        logger.info("live update: %d added, %d replaced", len(added), len(replaced))
        return UpdateResult(added, replaced, (), len(self.searcher), self.searcher.version)

    def delete(self, ids: list[str]) -> UpdateResult:
        """Delete entities by id; all or nothing (:class:`EntitiesNotFound` if one is absent)."""
        m = self.searcher.manifest
        with folder_lock(self.folder, self.lock_timeout_s):
            self.searcher.refresh()
            missing = [i for i in ids if self.searcher.row_of(i) is None]
            if missing:
                raise EntitiesNotFound(missing)
            empty = {f: np.zeros((0, *s), dtype="<f2") for f, s in m.store_fields.items()}
            write_segment(
                self.folder,
                self.searcher.base_version,
                m.model_fingerprint,
                [],
                empty,
                np.zeros((0, m.retrieval_dim), dtype=np.float32),
                list(dict.fromkeys(ids)),
            )
            self.searcher.refresh()
        logger.info("live update: %d deleted", len(ids))
        return UpdateResult((), (), tuple(ids), len(self.searcher), self.searcher.version)


__all__ = ["EntitiesNotFound", "LiveKb", "NewEntity", "UpdateResult"]
