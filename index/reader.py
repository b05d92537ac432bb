"""Reader stage of the index job: ``kb.jsonl`` streamed into this shard's chunks of entities.

The KB is read in chunks of ``chunk_size`` raw lines, in KB order; chunk c belongs to shard
``c % num_shards``. A chunk is the unit of sharding, resume and progress (and of memory use):
only this shard's unfinished chunks are parsed, bad records are counted in the chunk's report,
never raised.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from models.data.schema import Entity, RecordReport, parse_entity


def kb_file(kb: str | Path) -> Path:
    """The KB file of ``--kb``: a ``kb.jsonl`` file, or a canonical dataset folder holding one."""
    p = Path(kb)
    return p / "kb.jsonl" if p.is_dir() else p


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            n += block.count(b"\n")
    return n


def iter_raw_chunks(path: Path, chunk_size: int) -> Iterator[tuple[int, int, list[bytes]]]:
    """(chunk id, first line number, raw lines) in KB order."""
    with open(path, "rb") as f:
        c, lines, first = 0, [], 1
        for lineno, line in enumerate(f, start=1):
            lines.append(line)
            if len(lines) == chunk_size:
                yield c, first, lines
                c, lines, first = c + 1, [], lineno + 1
        if lines:
            yield c, first, lines


def parse_lines(lines: list[bytes], first_line: int, report: RecordReport) -> list[Entity]:
    """The valid entities of raw KB lines; blank lines skipped, bad ones counted in ``report``."""
    out = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"kb.jsonl:{first_line + i}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            report.add("entity.bad_json", f"{where}: {exc.msg}")
            continue
        ent = parse_entity(obj, report, where)
        if ent is not None:
            out.append(ent)
    return out


@dataclass
class KBChunk:
    """One parsed chunk; later stages add their own bad records to ``report``."""

    index: int  # chunk id, in KB order
    lines: int  # raw lines, bad and blank ones included (what progress counts)
    entities: list[Entity]
    report: RecordReport = field(default_factory=RecordReport)


class KBReader:
    """This shard's chunks of one KB file."""

    def __init__(self, path: Path, chunk_size: int, num_shards: int = 1, shard_id: int = 0) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.num_shards = num_shards
        self.shard_id = shard_id
        self.total_lines = count_lines(path)
        self.total_chunks = -(-self.total_lines // chunk_size)
        self.chunks = [c for c in range(self.total_chunks) if self.in_shard(c)]

    def in_shard(self, chunk: int) -> bool:
        return chunk % self.num_shards == self.shard_id

    def chunk_lines(self, chunk: int) -> int:
        return min(self.chunk_size, self.total_lines - chunk * self.chunk_size)

    def read(self, skip: Collection[int] = ()) -> Iterator[KBChunk]:
        """This shard's chunks in KB order, parsed; those in ``skip`` (finished by an earlier
        run) are not parsed."""
        for c, first, lines in iter_raw_chunks(self.path, self.chunk_size):
            if not self.in_shard(c) or c in skip:
                continue
            report = RecordReport()
            yield KBChunk(c, len(lines), parse_lines(lines, first, report), report)


__all__ = ["KBChunk", "KBReader", "count_lines", "iter_raw_chunks", "kb_file", "parse_lines"]
