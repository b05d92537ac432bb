"""Raw backbone features for a dataset, encoded once (frozen-backbone training and evaluation).

With the backbone frozen, everything upstream of MIMIC's trainable layers (``image_cls_fc``,
``image_tokens_fc``, the matcher) is a pure function of the input, so it is encoded once and
cached on disk, keyed by the backbone's weight fingerprint + preprocessing settings + the
dataset files. Training the interaction layers then costs minutes on a CPU.

Layout of one :class:`FeatureTable` (rows = items: KB entities or mentions):
    text_global (N, dt) fp32, text_tokens (N, L, dt) fp16,
    image table: image_global (M, Dg) fp32, image_tokens (M, P, Dt) fp16, row 0 = "no image",
    item -> image rows: ragged ``image_offsets`` (N + 1,) into ``image_index`` (first = eval image).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.data.schema import Entity, MelDataset, Mention, RecordReport
from models.encoders import ImageFeatures, MimicEncoder, TextFeatures
from models.onnx_encoders import resolve_runtime, runtime_of, use_runtime
from models.preprocess import entity_text, load_image_or_none, mention_text

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class FeatureTable:
    text_global: torch.Tensor
    text_tokens: torch.Tensor
    image_global: torch.Tensor
    image_tokens: torch.Tensor
    image_offsets: torch.Tensor
    image_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.text_global.shape[0])

    def first_image_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Image-table row of each item's first image (0 = no image): the eval rule."""
        start, end = self.image_offsets[rows], self.image_offsets[rows + 1]
        if len(self.image_index) == 0:
            return torch.zeros_like(rows)
        first = self.image_index[start.clamp_max(len(self.image_index) - 1)]
        return torch.where(end > start, first, torch.zeros_like(first))

    def random_image_rows(self, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random image of each item (the released training rule), 0 = no image."""
        start, end = self.image_offsets[rows], self.image_offsets[rows + 1]
        n = end - start
        pick = (torch.rand(len(rows), generator=gen) * n.clamp_min(1)).long()
        if len(self.image_index) == 0:
            return torch.zeros_like(rows)
        chosen = self.image_index[(start + pick).clamp_max(len(self.image_index) - 1)]
        return torch.where(n > 0, chosen, torch.zeros_like(chosen))

    def gather(
        self,
        rows: torch.Tensor,
        image_rows: torch.Tensor,
    ) -> tuple[TextFeatures, ImageFeatures]:
        """fp32 features of the given items (with the given image rows)."""
        return (
            TextFeatures(self.text_global[rows].float(), self.text_tokens[rows].float()),
            ImageFeatures(
                self.image_global[image_rows].float(), self.image_tokens[image_rows].float()
            ),
        )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in (
            "text_global",
            "text_tokens",
            "image_global",
            "image_tokens",
            "image_offsets",
            "image_index",
        ):
            np.save(folder / f"{name}.npy", getattr(self, name).numpy())

    @classmethod
    def load(cls, folder: Path) -> FeatureTable:
        def ld(name: str) -> torch.Tensor:
            return torch.from_numpy(np.load(folder / f"{name}.npy"))

        return cls(
            ld("text_global"),
            ld("text_tokens"),
            ld("image_global"),
            ld("image_tokens"),
            ld("image_offsets"),
            ld("image_index"),
        )


def _decode_all(
    paths: Sequence[Path],
    report: RecordReport,
    workers: int,
) -> list[Image.Image | None]:
    def one(p: Path) -> Image.Image | None:
        return load_image_or_none(
            p, on_error=lambda path, why: report.add("image.unreadable", f"{path}: {why}")
        )

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


@torch.inference_mode()
def encode_items(
    encoder: MimicEncoder,
    texts: Sequence[str],
    image_paths: Sequence[Sequence[Path]],
    batch_size: int = 32,
    workers: int = 4,
    desc: str = "encode",
    report: RecordReport | None = None,
) -> FeatureTable:
    """Encode texts + every listed image with the (frozen) backbone, in batches."""
    report = report if report is not None else RecordReport()
    encoder.eval()
    n = len(texts)
    tg, tt = [], []
    for s in tqdm(range(0, n, batch_size), desc=f"{desc} text", unit="batch", leave=False):
        f = encoder.text_features(texts[s : s + batch_size])
        tg.append(f.global_.float().cpu())
        tt.append(f.tokens.half().cpu())
    blank = encoder.no_image_features()
    ig, it = [blank.global_.float().cpu()], [blank.tokens.half().cpu()]
    flat = [(i, p) for i, ps in enumerate(image_paths) for p in ps]
    offsets = np.zeros(n + 1, dtype=np.int64)
    for i, ps in enumerate(image_paths):
        offsets[i + 1] = offsets[i] + len(ps)
    index = np.zeros(len(flat), dtype=np.int64)
    next_row = 1
    bar = tqdm(total=len(flat), desc=f"{desc} images", unit="img", leave=False)
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        imgs = _decode_all([p for _, p in chunk], report, workers)
        ok = [j for j, im in enumerate(imgs) if im is not None]
        if ok:
            fi = encoder.image_features([imgs[j] for j in ok])
            ig.append(fi.global_.float().cpu())
            it.append(fi.tokens.half().cpu())
        for pos, j in enumerate(ok):
            index[s + j] = next_row + pos
            # an unreadable image keeps row 0: the no-image rule (counted in the report)
        next_row += len(ok)
        bar.update(len(chunk))
    bar.close()
    return FeatureTable(
        torch.cat(tg),
        torch.cat(tt),
        torch.cat(ig),
        torch.cat(it),
        torch.from_numpy(offsets),
        torch.from_numpy(index),
    )


def entity_inputs(ds: MelDataset) -> tuple[list[str], list[list[Path]]]:
    return (
        [entity_text(e.name, e.attributes) for e in ds.entities],
        [[ds.resolve(p) for p in e.images] for e in ds.entities],
    )


def mention_inputs(
    ds: MelDataset, mentions: Sequence[Mention]
) -> tuple[list[str], list[list[Path]]]:
    return (
        [mention_text(m.mention, m.sentence) for m in mentions],
        [[ds.resolve(m.image)] if m.image else [] for m in mentions],
    )


def _dataset_key(ds: MelDataset) -> str:
    h = hashlib.sha256()
    for name in ("kb.jsonl", "mentions.jsonl"):
        p = ds.root / name
        if p.is_file():
            st = p.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclass
class DatasetFeatures:
    """Cached raw features of a dataset's KB and all its mentions (row = mention order)."""

    entities: FeatureTable
    mentions: FeatureTable
    mention_row: dict[str, int]

    def mention_rows(self, mentions: Sequence[Mention]) -> torch.Tensor:
        return torch.tensor([self.mention_row[m.id] for m in mentions], dtype=torch.long)


def dataset_features(
    encoder: MimicEncoder,
    ds: MelDataset,
    cache_dir: str | os.PathLike[str] | None,
    batch_size: int = 32,
    workers: int = 4,
    runtime: str | None = None,
) -> DatasetFeatures:
    """Raw backbone features of ``ds`` (KB + every mention), from the cache when present.

    The frozen towers run with ``runtime`` (None: as ``encoder`` runs them). The CLIs pass the
    backend's default (:func:`default_runtime`), what the index job and the server run (onnx
    for minilm-effnet, equal to torch within 1e-4), so the index job finds these features
    under the same key (``mel-index build --feature-cache``)."""
    mentions = list(ds.mentions.values())
    with frozen_runtime(encoder, runtime, cache_dir):
        folder = Path(cache_dir) / cache_key(encoder, ds) if cache_dir is not None else None
        if folder is not None and (folder / "done.json").is_file():
            logger.info("feature cache hit: %s", folder)
            done = json.loads((folder / "done.json").read_text())
            return DatasetFeatures(
                FeatureTable.load(folder / "entities"),
                FeatureTable.load(folder / "mentions"),
                {mid: i for i, mid in enumerate(done["mention_ids"])},
            )
        return _encode_dataset(encoder, ds, mentions, folder, batch_size, workers)


def default_runtime(encoder: MimicEncoder, runtime: str | None = None) -> str:
    """``runtime`` if given, else the encoder backend's default (the index job's and the
    server's when they are not told otherwise)."""
    return resolve_runtime(runtime, encoder.config.backend)


@contextlib.contextmanager
def frozen_runtime(
    encoder: MimicEncoder, runtime: str | None, cache_dir: str | os.PathLike[str] | None
) -> Iterator[None]:
    """Run the frozen towers with ``runtime`` inside the block, then as before. ONNX exports
    go to ``$MEL_ONNX_CACHE``, else ``<cache_dir>/onnx`` (shared with the index job and the
    server when they are given the same folder)."""
    before = runtime_of(encoder)
    want = before if runtime is None else runtime
    if want == before:
        yield
        return
    onnx = os.environ.get("MEL_ONNX_CACHE") or str(Path(cache_dir or "artifacts/cache") / "onnx")
    use_runtime(encoder, want, onnx, torch.get_num_threads())
    try:
        yield
    finally:
        use_runtime(encoder, before, onnx, torch.get_num_threads())


def cache_key(encoder: MimicEncoder, ds: MelDataset) -> str:
    """What a dataset's cached features depend on: backbone weights and runtime,
    preprocessing, files."""
    runtime = runtime_of(encoder)
    return hashlib.sha256(
        json.dumps(
            {
                "v": CACHE_VERSION,
                "backbone": encoder.backbone.weights_fingerprint(),
                # features of another encoder runtime (onnx, onnx-int8) are cached apart; the
                # torch key stays what it was, so existing caches stay valid
                **({"runtime": runtime} if runtime != "torch" else {}),
                "text_max_length": encoder.config.text_max_length,
                "image_size": encoder.config.image_size,
                "dataset": str(ds.root.resolve()),
                "files": _dataset_key(ds),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]


def cached_entity_features(
    encoder: MimicEncoder, ds: MelDataset, cache_dir: str | os.PathLike[str]
) -> tuple[FeatureTable, dict[str, int]] | None:
    """The KB's cached features (table, entity id -> row) when training already encoded
    them with this backbone, else None (nothing is encoded here): the index job's shortcut."""
    folder = Path(cache_dir) / cache_key(encoder, ds)
    if not (folder / "done.json").is_file():
        return None
    logger.info("entity features from the training cache: %s", folder)
    return FeatureTable.load(folder / "entities"), {e.id: i for i, e in enumerate(ds.entities)}


def _encode_dataset(
    encoder: MimicEncoder,
    ds: MelDataset,
    mentions: list[Mention],
    folder: Path | None,
    batch_size: int,
    workers: int,
) -> DatasetFeatures:
    report = RecordReport()
    ent = encode_items(
        encoder,
        *entity_inputs(ds),
        batch_size=batch_size,
        workers=workers,
        desc="entities",
        report=report,
    )
    men = encode_items(
        encoder,
        *mention_inputs(ds, mentions),
        batch_size=batch_size,
        workers=workers,
        desc="mentions",
        report=report,
    )
    report.log("feature encoding")
    feats = DatasetFeatures(ent, men, {m.id: i for i, m in enumerate(mentions)})
    if folder is not None:
        ent.save(folder / "entities")
        men.save(folder / "mentions")
        (folder / "done.json").write_text(
            json.dumps({"mention_ids": [m.id for m in mentions], "report": report.to_json()})
        )
        logger.info("feature cache written: %s", folder)
    return feats


__all__ = [
    "DatasetFeatures",
    "Entity",
    "FeatureTable",
    "cache_key",
    "cached_entity_features",
    "dataset_features",
    "default_runtime",
    "encode_items",
    "entity_inputs",
    "frozen_runtime",
    "mention_inputs",
]
