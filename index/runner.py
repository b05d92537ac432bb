"""The encoding loop: reader -> encoder -> writer, one chunk at a time, timed per stage.

After rom1504/clip-retrieval's ``clip_inference/runner.py``: the stages live in their own files
(:mod:`index.reader`, :mod:`index.encode`, :mod:`index.writer`) and share only the chunk they
pass along (:class:`index.reader.KBChunk`); the runner moves each chunk through them and measures
where the time goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from index.reader import KBChunk
from models.data.schema import Entity, RecordReport


class Encoder(Protocol):
    """The encoder stage (:class:`index.encode.ChunkEncoder`): store fields, one row per entity."""

    def encode(self, entities: list[Entity], report: RecordReport) -> dict[str, np.ndarray]: ...


class Writer(Protocol):
    """The writer stage (:class:`index.writer.ChunkWriter`): one encoded chunk, atomically."""

    def write(self, chunk: KBChunk, fields: dict[str, np.ndarray]) -> None: ...


@dataclass(frozen=True)
class RunStats:
    """What one run encoded, and the seconds each stage took (read includes parsing; encode
    includes image decoding)."""

    chunks: int
    lines: int
    entities: int
    read_s: float
    encode_s: float
    write_s: float

    @property
    def seconds(self) -> float:
        return self.read_s + self.encode_s + self.write_s


class Runner:
    """Runs the chunks of ``reader`` through ``encoder`` then ``writer``, one at a time."""

    def __init__(self, reader: Iterable[KBChunk], encoder: Encoder, writer: Writer) -> None:
        self.reader = reader
        self.encoder = encoder
        self.writer = writer

    def __call__(self, on_chunk: Callable[[KBChunk], None] | None = None) -> RunStats:
        """Run every chunk through the stages; ``on_chunk`` is told of each one written."""
        chunks = lines = entities = 0
        read_s = encode_s = write_s = 0.0
        it = iter(self.reader)
        while True:
            t0 = time.perf_counter()
            chunk = next(it, None)
            t1 = time.perf_counter()
            read_s += t1 - t0
            if chunk is None:
                break
            fields = self.encoder.encode(chunk.entities, chunk.report)
            t2 = time.perf_counter()
            self.writer.write(chunk, fields)
            t3 = time.perf_counter()
            encode_s += t2 - t1
            write_s += t3 - t2
            chunks += 1
            lines += chunk.lines
            entities += len(chunk.entities)
            if on_chunk is not None:
                on_chunk(chunk)
        return RunStats(chunks, lines, entities, read_s, encode_s, write_s)


__all__ = ["Encoder", "RunStats", "Runner", "Writer"]
