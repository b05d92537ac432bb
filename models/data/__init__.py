"""Datasets: the canonical KB + mention format, converters from published layouts, and the
generated demo world. Plain data code: importable by training, the index job and the service."""

from models.data.schema import (
    Entity,
    MelDataset,
    Mention,
    RecordReport,
    iter_entities,
    iter_mentions,
    load_dataset,
)

__all__ = [
    "Entity",
    "MelDataset",
    "Mention",
    "RecordReport",
    "iter_entities",
    "iter_mentions",
    "load_dataset",
]
