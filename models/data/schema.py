"""The canonical on-disk format for a knowledge base and a mention dataset.

One dataset is one folder, readable with plain Python (``json`` line by line)::

    <root>/
      meta.json        {"format": "mel-canonical", "version": 1, "name": ..., "source": ...,
                        "report": {<bad-record counts written by the converter/generator>}}
      kb.jsonl         one entity per line:
                       {"id": "Q42", "name": "Douglas Adams",
                        "attributes": "Sex: male. Occupation: writer.",
                        "images": ["images/kb/Q42_0.jpg"],            # zero or more
                        "aliases": ["Douglas Noel Adams"],            # optional
                        "popularity": 1234.0}                         # optional, >= 0
      mentions.jsonl   one mention per line:
                       {"id": "m17", "mention": "Adams",
                        "sentence": "Adams wrote the Guide in 1979.",
                        "span": [0, 5],                  # char offsets into sentence, or null
                        "image": "images/mentions/m17.jpg",   # or null
                        "entity_id": "Q42"}              # gold entity id, or null for NIL
      splits.json      {"train": ["m1", ...], "dev": [...], "test": [...]}
      images/          image files; every image path above is relative to <root>

The KB is streamed (``iter_entities``), never required to fit in memory: a Wikidata-size
``kb.jsonl`` works the same way as the demo world's.

Bad records never crash a reader and never silently vanish: each is counted in a
:class:`RecordReport` under a reason (``entity.missing_field``, ``mention.unknown_entity``, ...)
with the first few examples kept for the log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_NAME = "mel-canonical"
FORMAT_VERSION = 1
KB_FILE = "kb.jsonl"
MENTIONS_FILE = "mentions.jsonl"
SPLITS_FILE = "splits.json"
META_FILE = "meta.json"
SPLIT_NAMES = ("train", "dev", "test")


@dataclass(frozen=True, slots=True)
class Entity:
    """One knowledge-base entity. ``images`` are paths relative to the dataset root;
    ``aliases`` are other names it goes by (searched by the lexical channel, ``index.lexical``);
    ``popularity`` is any non-negative prior (page views, sitelinks), ``None`` when unknown."""

    id: str
    name: str
    attributes: str = ""
    images: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    popularity: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "attributes": self.attributes,
            "images": list(self.images),
        }
        # optional fields only when present: a KB without them is written byte for byte as
        # before (kb.jsonl, an index folder's entities.jsonl)
        if self.aliases:
            out["aliases"] = list(self.aliases)
        if self.popularity is not None:
            out["popularity"] = self.popularity
        return out


@dataclass(frozen=True, slots=True)
class Mention:
    """One mention. ``span`` is ``(start, end)`` char offsets into ``sentence`` (end exclusive);
    ``entity_id`` is the gold entity, ``None`` for NIL."""

    id: str
    mention: str
    sentence: str
    span: tuple[int, int] | None = None
    image: str | None = None
    entity_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "mention": self.mention,
            "sentence": self.sentence,
            "span": list(self.span) if self.span is not None else None,
            "image": self.image,
            "entity_id": self.entity_id,
        }


@dataclass
class RecordReport:
    """Counts of bad records by reason, with the first ``max_examples`` examples of each."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append(example[:200])

    def merge(self, other: RecordReport) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            kept = self.examples.setdefault(reason, [])
            kept.extend(other.examples.get(reason, [])[: self.max_examples - len(kept)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> RecordReport:
        """The inverse of :meth:`to_json` (``meta.json``'s ``report``); None -> empty."""
        doc = doc or {}
        return cls(
            counts=Counter({str(k): int(v) for k, v in (doc.get("counts") or {}).items()}),
            examples={str(k): list(v) for k, v in (doc.get("examples") or {}).items()},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())},
        }

    def log(self, what: str) -> None:
        if not self.total:
            logger.info("%s: no bad records", what)
            return
        for reason, n in sorted(self.counts.items()):
            logger.warning("%s: %d x %s (e.g. %s)", what, n, reason, self.examples[reason][:2])


# ----------------------------------------------------------------------------------- parsing


def _as_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_entity(obj: Any, report: RecordReport, where: str = "") -> Entity | None:
    """Validate one decoded JSON object as an :class:`Entity`; count and drop it if bad."""
    if not isinstance(obj, dict):
        report.add("entity.not_an_object", where)
        return None
    eid = _as_str(obj.get("id"))
    name = obj.get("name")
    if eid is None or not eid.strip():
        report.add("entity.missing_field", f"{where} id={obj.get('id')!r}")
        return None
    if not isinstance(name, str) or not name.strip():
        report.add("entity.missing_field", f"{where} id={eid} name={name!r}")
        return None
    attributes = obj.get("attributes", "")
    if attributes is None:
        attributes = ""
    if not isinstance(attributes, str):
        report.add("entity.bad_attributes", f"{where} id={eid}")
        attributes = str(attributes)
    images_raw = obj.get("images") or []
    if isinstance(images_raw, str):
        images_raw = [images_raw]
    images = tuple(p for p in images_raw if isinstance(p, str) and p)
    if len(images) != len(images_raw):
        report.add("entity.bad_image_path", f"{where} id={eid}")
    aliases_raw = obj.get("aliases")
    if aliases_raw is None:
        aliases_raw = []
    if not isinstance(aliases_raw, list):
        report.add("entity.bad_aliases", f"{where} id={eid} aliases={aliases_raw!r}")
        aliases_raw = []
    aliases = tuple(a for a in aliases_raw if isinstance(a, str) and a.strip())
    if len(aliases) != len(aliases_raw):
        report.add("entity.bad_aliases", f"{where} id={eid}")
    popularity = obj.get("popularity")
    if popularity is not None:
        ok = (
            isinstance(popularity, int | float)
            and not isinstance(popularity, bool)
            and math.isfinite(popularity)
            and popularity >= 0
        )
        if not ok:
            report.add("entity.bad_popularity", f"{where} id={eid} popularity={popularity!r}")
            popularity = None
    return Entity(
        id=eid,
        name=name,
        attributes=attributes,
        images=images,
        aliases=aliases,
        popularity=None if popularity is None else float(popularity),
    )


def parse_mention(obj: Any, report: RecordReport, where: str = "") -> Mention | None:
    """Validate one decoded JSON object as a :class:`Mention`; count and drop it if bad.

    A span that does not fit the sentence is dropped (the mention is kept, span=None) and
    counted as ``mention.bad_span``.
    """
    if not isinstance(obj, dict):
        report.add("mention.not_an_object", where)
        return None
    mid = _as_str(obj.get("id"))
    surface = obj.get("mention")
    sentence = obj.get("sentence")
    if (
        mid is None
        or not isinstance(surface, str)
        or not surface.strip()
        or not isinstance(sentence, str)
    ):
        report.add("mention.missing_field", f"{where} id={obj.get('id')!r}")
        return None
    if "entity_id" not in obj:
        report.add("mention.missing_field", f"{where} id={mid} (no entity_id; use null for NIL)")
        return None
    gold = obj["entity_id"]
    if gold is not None:
        gold = _as_str(gold)
        if gold is None:
            report.add("mention.missing_field", f"{where} id={mid} entity_id={obj['entity_id']!r}")
            return None
    span = None
    span_raw = obj.get("span")
    if span_raw is not None:
        ok = (
            isinstance(span_raw, list | tuple)
            and len(span_raw) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in span_raw)
            and 0 <= span_raw[0] < span_raw[1] <= len(sentence)
        )
        if ok:
            span = (int(span_raw[0]), int(span_raw[1]))
        else:
            report.add("mention.bad_span", f"{where} id={mid} span={span_raw!r}")
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        report.add("mention.bad_image_path", f"{where} id={mid}")
        image = None
    return Mention(
        id=mid, mention=surface, sentence=sentence, span=span, image=image, entity_id=gold
    )


def _iter_json_lines(path: Path, kind: str, report: RecordReport) -> Iterator[tuple[str, Any]]:
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                report.add(f"{kind}.bad_json", f"{where}: {exc.msg}")


def iter_entities(
    path: str | os.PathLike[str],
    report: RecordReport | None = None,
) -> Iterator[Entity]:
    """Stream entities from a ``kb.jsonl`` file (constant memory). Duplicate ids are counted
    (``entity.duplicate_id``) and only the first is kept."""
    report = report if report is not None else RecordReport()
    seen: set[str] = set()
    for where, obj in _iter_json_lines(Path(path), "entity", report):
        ent = parse_entity(obj, report, where)
        if ent is None:
            continue
        if ent.id in seen:
            report.add("entity.duplicate_id", f"{where} id={ent.id}")
            continue
        seen.add(ent.id)
        yield ent


def iter_mentions(
    path: str | os.PathLike[str],
    report: RecordReport | None = None,
) -> Iterator[Mention]:
    """Stream mentions from a ``mentions.jsonl`` file. Duplicate ids are counted and dropped."""
    report = report if report is not None else RecordReport()
    seen: set[str] = set()
    for where, obj in _iter_json_lines(Path(path), "mention", report):
        m = parse_mention(obj, report, where)
        if m is None:
            continue
        if m.id in seen:
            report.add("mention.duplicate_id", f"{where} id={m.id}")
            continue
        seen.add(m.id)
        yield m


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Entity | Mention]) -> int:
    """Write records as JSON Lines (atomically: temp file + rename). Returns the count."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec.to_json(), ensure_ascii=False))
            f.write("\n")
            n += 1
    tmp.replace(path)
    return n


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)


def write_meta(
    root: str | os.PathLike[str],
    name: str,
    source: str,
    report: RecordReport | None = None,
    **extra: Any,
) -> None:
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": name,
        "source": source,
        **extra,
        "report": (report or RecordReport()).to_json(),
    }
    write_json(Path(root) / META_FILE, meta)


# ----------------------------------------------------------------------------------- dataset


@dataclass
class MelDataset:
    """A loaded canonical dataset: the KB index, the mentions and their splits.

    Loading keeps one :class:`Entity` per KB row in memory, which is what training and
    evaluation need; the index job streams ``kb.jsonl`` with :func:`iter_entities` instead.
    """

    root: Path
    entities: list[Entity]
    mentions: dict[str, Mention]
    splits: dict[str, list[str]]
    report: RecordReport
    meta: dict[str, Any]
    entity_row: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.entity_row = {e.id: i for i, e in enumerate(self.entities)}

    def split(self, name: str) -> list[Mention]:
        """Mentions of one split, in split-file order."""
        if name not in self.splits:
            raise KeyError(f"split {name!r} not in {sorted(self.splits)}")
        return [self.mentions[mid] for mid in self.splits[name]]

    def resolve(self, relpath: str) -> Path:
        """Absolute path of an image path stored relative to the dataset root."""
        return self.root / relpath

    def summary(self) -> dict[str, Any]:
        n_img_ent = sum(1 for e in self.entities if e.images)
        ms = list(self.mentions.values())
        return {
            "entities": len(self.entities),
            "entities_with_image": n_img_ent,
            "mentions": len(ms),
            "mentions_with_image": sum(1 for m in ms if m.image),
            "nil_mentions": sum(1 for m in ms if m.entity_id is None),
            "splits": {k: len(v) for k, v in self.splits.items()},
            # the converter's problems (meta.json) and the loader's own, together
            "bad_records": self.all_problems().total,
        }

    def all_problems(self) -> RecordReport:
        """Bad records found when the folder was written (``meta.json``) and when loaded."""
        out = RecordReport.from_json(self.meta.get("report"))
        out.merge(self.report)
        return out


def load_dataset(root: str | os.PathLike[str], check_images: bool = True) -> MelDataset:
    """Load a canonical dataset folder.

    Mentions whose gold id is not in the KB are counted (``mention.unknown_entity``) and left
    out; split entries naming unknown mentions are counted (``split.unknown_mention``).
    With ``check_images``, image paths that do not exist are counted (``*.missing_image``) and
    treated as "no image" (decoding failures are handled, and counted, where images are read).
    """
    root = Path(root)
    if not (root / KB_FILE).is_file():
        raise FileNotFoundError(f"{root} is not a canonical MEL dataset: no {KB_FILE}")
    meta: dict[str, Any] = {}
    if (root / META_FILE).is_file():
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") not in (None, FORMAT_NAME) or meta.get("version", 1) > FORMAT_VERSION:
            raise ValueError(
                f"{root / META_FILE}: unsupported format {meta.get('format')!r} "
                f"version {meta.get('version')!r}"
            )
    report = RecordReport()
    entities: list[Entity] = []
    for ent in iter_entities(root / KB_FILE, report):
        if check_images and ent.images:
            kept = tuple(p for p in ent.images if (root / p).is_file())
            for p in ent.images:
                if p not in kept:
                    report.add("entity.missing_image", f"id={ent.id} {p}")
            if len(kept) != len(ent.images):
                ent = dataclasses.replace(ent, images=kept)
        entities.append(ent)
    known = {e.id for e in entities}

    mentions: dict[str, Mention] = {}
    if (root / MENTIONS_FILE).is_file():
        for m in iter_mentions(root / MENTIONS_FILE, report):
            if m.entity_id is not None and m.entity_id not in known:
                report.add("mention.unknown_entity", f"id={m.id} entity_id={m.entity_id}")
                continue
            if check_images and m.image and not (root / m.image).is_file():
                report.add("mention.missing_image", f"id={m.id} {m.image}")
                m = Mention(m.id, m.mention, m.sentence, m.span, None, m.entity_id)
            mentions[m.id] = m

    splits: dict[str, list[str]] = {}
    if (root / SPLITS_FILE).is_file():
        raw = json.loads((root / SPLITS_FILE).read_text(encoding="utf-8"))
        for name, ids in raw.items():
            kept_ids = []
            for mid in ids:
                mid = str(mid)
                if mid in mentions:
                    kept_ids.append(mid)
                else:
                    report.add("split.unknown_mention", f"{name}: {mid}")
            splits[name] = kept_ids
    ds = MelDataset(
        root=root, entities=entities, mentions=mentions, splits=splits, report=report, meta=meta
    )
    report.log(f"dataset {root}")
    return ds


def find_span(mention: str, sentence: str) -> tuple[int, int] | None:
    """First case-insensitive occurrence of ``mention`` in ``sentence`` as a char span."""
    if not mention:
        return None
    start = sentence.lower().find(mention.lower())
    if start < 0:
        return None
    return (start, start + len(mention))


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KB_FILE",
    "MENTIONS_FILE",
    "META_FILE",
    "SPLITS_FILE",
    "SPLIT_NAMES",
    "Entity",
    "MelDataset",
    "Mention",
    "RecordReport",
    "find_span",
    "iter_entities",
    "iter_mentions",
    "load_dataset",
    "parse_entity",
    "parse_mention",
    "write_json",
    "write_jsonl",
    "write_meta",
]
