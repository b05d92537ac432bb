"""Converters from published multimodal-entity-linking layouts to the canonical format.

Two layouts are read (see :mod:`models.data.schema` for what is written):

* :func:`convert_mimic`: the cleaned WikiMEL / RichpediaMEL / WikiDiverse files of the MIMIC
  authors (Luo et al., "Multi-Grained Multimodal Interaction Network for Entity Linking",
  KDD 2023; github.com/pengfei-luo/MIMIC, ``codes/utils/dataset.py`` at b194a43):
  ``kb_entity.json``, ``qid2id.json``, ``*train*.json`` / ``*dev*.json`` / ``*test*.json``,
  ``kb_image/`` and ``mention_image/``. Names and mentions are URL-unquoted and mention images
  are mapped to ``<first part of the base name>.jpg`` exactly as that code does; an entity's
  image order is kept, because their evaluation uses the first image.
* :func:`convert_melbench`: MELBench's ``Wikidata-MEL.json`` (seukgcode/MELBench) with the
  MEL-GHMFC side files ``qid2ne.json`` (names), ``qid2abs.json`` (attribute text; its QIDs
  are the KB), ``splits.json`` (sample ids) and ``mention_images/<sample id>.jpg``.

Images are linked, not copied, by default: ``<out>/images/kb`` and ``<out>/images/mentions``
become symlinks to the resolved source folders (one link per folder), and records hold paths
such as ``images/mentions/123.jpg``. ``copy_images=True`` copies only the files in use.
Every referenced image is opened and verified with PIL (in a thread pool); a missing or
unreadable one is counted and the record keeps going without it.

Problems are never fatal and never silent: each is counted in the returned
:class:`~models.data.schema.RecordReport` (also written to ``meta.json``, which is written
last, so a folder without it is an interrupted conversion). Reasons used:

=================================  ========================================================
``entity.missing_field``           no usable id / name: entity dropped
``entity.duplicate_id``            id seen before: later one dropped
``entity.bad_type``                MIMIC ``type`` other than "entity": dropped
``entity.no_qid``                  MIMIC int id absent from qid2id: kept as ``id:<int>``
``entity.missing_attributes``      no attribute text: kept with ""
``entity.bad_image_list``          ``image_list`` not a list: kept without images
``entity.bad_image_path``          an image name that is not a plain relative path: skipped
``entity.missing_image``           listed image file absent: kept without that image
``entity.unreadable_image``        listed image does not decode: kept without that image
``entity.name_without_attributes`` MELBench QID in qid2ne.json but not qid2abs.json: not in KB
``qid2id.bad_entry``               qid2id value that is not an int id: ignored
``qid2id.duplicate_id``            two QIDs for one int id: the first is used
``*.duplicate_key``                a JSON object repeats a key: the first value is used
``sample.not_an_object``           MELBench sample that is not an object: dropped
``sample.missing_field``           MELBench sample without sentence / mentions / answer
``sample.length_mismatch``         ``len(mentions) != len(answer)``: whole sample dropped
``sample.id_mismatch``             sample ``id`` differs from its key: the key is used
``sample.no_mentions``             MELBench sample with an empty mention list
``sample.not_in_split``            MELBench sample in no split: mentions kept, unused
``mention.not_an_object``          MIMIC split entry that is not an object: dropped
``mention.missing_field``          no mention text / sentence / answer: dropped
``mention.unknown_entity``         gold id not in the KB: dropped (kept out of the splits)
``mention.duplicate_id``           MIMIC mention id seen before: renamed ``<split>-<index>``
``mention.no_span``                mention text not found in the sentence: kept, span null
``mention.bad_image_path``         ``imgPath`` is not a string: kept without image
``mention.missing_image``          referenced image file absent: kept without image
``mention.unreadable_image``       referenced image does not decode: kept without image
``*.copy_failed``                  copy mode could not copy a file: kept without it
``split.unknown_sample``           MELBench split lists a sample id absent from the data
``split.duplicate_sample``         sample id listed twice / in two splits: first one wins
``split.bad_list``                 a split that is not a list: ignored
=================================  ========================================================

Spans: :func:`~models.data.schema.find_span` first; when the mention is not a substring
(MELBench drops particles: "Hermann Beckerath" in "Hermann von Beckerath"), the mention's
words are matched in order with at most ``MAX_GAP_WORDS`` words between them and the span
covers the whole stretch. Such spans are tallied in ``meta.json`` ``stats.spans_gapped``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import unquote

from PIL import Image

from models.data.schema import (
    KB_FILE,
    MENTIONS_FILE,
    META_FILE,
    SPLIT_NAMES,
    SPLITS_FILE,
    Entity,
    Mention,
    RecordReport,
    find_span,
    write_json,
    write_jsonl,
    write_meta,
)

logger = logging.getLogger(__name__)

KB_IMAGES = "images/kb"
MENTION_IMAGES = "images/mentions"
# Words MELBench removed from a mention ("von", "de", "of the") sit between its kept words;
# three covers every case in WikiMEL without letting a match wander across the sentence.
MAX_GAP_WORDS = 3
# Image checks and copies wait on the disk more than on the GIL.
_WORKERS = min(32, 4 * (os.cpu_count() or 1))

_OK, _MISSING, _UNREADABLE = "ok", "missing_image", "unreadable_image"
_NIL = "nil"

T = TypeVar("T")
R = TypeVar("R")


# ----------------------------------------------------------------------------------- helpers


@dataclass
class _Stats:
    """Counts that describe (not fault) the conversion; written to meta.json ``stats``."""

    spans_exact: int = 0
    spans_gapped: int = 0
    images_checked: int = 0
    images_copied: int = 0
    unused_source_images: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def span(self, mention: str, sentence: str) -> tuple[int, int] | None:
        span = find_span(mention, sentence)
        if span is not None:
            self.spans_exact += 1
            return span
        span = gapped_span(mention, sentence)
        if span is not None:
            self.spans_gapped += 1
        return span

    def to_json(self) -> dict[str, int]:
        return {
            "spans_exact": self.spans_exact,
            "spans_gapped": self.spans_gapped,
            "images_checked": self.images_checked,
            "images_copied": self.images_copied,
            "unused_source_images": self.unused_source_images,
            **self.extra,
        }


def gapped_span(
    mention: str,
    sentence: str,
    max_gap_words: int = MAX_GAP_WORDS,
) -> tuple[int, int] | None:
    """Span of the mention's words found in order (case-insensitive, whole words) with at most
    ``max_gap_words`` other words between consecutive ones; ``None`` for one-word mentions."""
    words = mention.split()
    if len(words) < 2:
        return None
    gap = rf"(?:\W+\w+){{0,{max_gap_words}}}?\W+"
    pattern = r"(?<!\w)" + gap.join(re.escape(w) for w in words) + r"(?!\w)"
    match = re.search(pattern, sentence, flags=re.IGNORECASE)
    return (match.start(), match.end()) if match else None


def _parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        return list(pool.map(fn, items))


def _check_image(path: Path) -> str:
    if not path.is_file():
        return _MISSING
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) on bad files
        return _UNREADABLE
    return _OK


def _check_images(paths: Iterable[Path], stats: _Stats) -> dict[Path, str]:
    """Status (ok / missing_image / unreadable_image) of each distinct path."""
    unique = list(dict.fromkeys(paths))
    stats.images_checked += len(unique)
    return dict(zip(unique, _parallel_map(_check_image, unique), strict=True))


def _load_json(path: Path, report: RecordReport, kind: str) -> Any:
    """``json.load`` that counts repeated object keys (plain json keeps the last one silently;
    here the first one wins, like everywhere else in the format)."""

    def first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                report.add(f"{kind}.duplicate_key", f"{path.name}: {key}")
                continue
            obj[key] = value
        return obj

    with path.open("r", encoding="utf-8") as f:
        return json.load(f, object_pairs_hook=first_wins)


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _as_id(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _safe_relpath(name: str) -> str | None:
    """``name`` as a relative POSIX path that stays inside its folder, else ``None``."""
    if not name or "\x00" in name:
        return None
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or any(part == ".." for part in path.parts) or not path.parts:
        return None
    return path.as_posix()


def _reset_path(path: Path) -> None:
    """Remove what an earlier conversion left at ``path``. A link to a source folder is only
    unlinked, never followed (copying into it would write into the source data)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _prepare_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise ValueError(f"output folder {out} is the source folder; choose another")
    out.mkdir(parents=True, exist_ok=True)
    # meta.json is written last: without it the folder reads as an unfinished conversion.
    for name in (META_FILE, KB_FILE, MENTIONS_FILE, SPLITS_FILE):
        if (out / name).is_file():
            (out / name).unlink()
    _reset_path(out / KB_IMAGES)
    _reset_path(out / MENTION_IMAGES)


def _place_images(
    out: Path, sub: str, src_dir: Path, rels: Sequence[str], copy: bool, stats: _Stats
) -> set[str]:
    """Make ``out/sub/<rel>`` resolve for each rel; returns the rels that failed to copy."""
    if not rels:
        return set()
    dst_root = out / sub
    dst_root.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        dst_root.symlink_to(src_dir.resolve(), target_is_directory=True)
        return set()
    dst_root.mkdir()

    def copy_one(rel: str) -> bool:
        dst = dst_root / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src_dir / rel, dst)
        except OSError:
            return False
        return True

    unique = list(dict.fromkeys(rels))
    done = _parallel_map(copy_one, unique)
    stats.images_copied += sum(done)
    return {rel for rel, ok in zip(unique, done, strict=True) if not ok}


def _finish(
    out: Path,
    name: str,
    source: str,
    entities: Iterable[Entity],
    mentions: list[Mention],
    splits: dict[str, list[str]],
    report: RecordReport,
    stats: _Stats,
    copy: bool,
    started: float,
) -> RecordReport:
    n_entities = write_jsonl(out / KB_FILE, entities)
    write_jsonl(out / MENTIONS_FILE, mentions)
    write_json(out / SPLITS_FILE, splits)
    summary = {
        "entities": n_entities,
        "mentions": len(mentions),
        "mentions_with_image": sum(1 for m in mentions if m.image),
        "nil_mentions": sum(1 for m in mentions if m.entity_id is None),
        "splits": {k: len(v) for k, v in splits.items()},
        **stats.to_json(),
    }
    write_meta(
        out,
        name=name,
        source=source,
        report=report,
        images="copy" if copy else "symlink",
        stats=summary,
    )
    report.log(f"convert {source}")
    logger.info(
        "converted %s -> %s in %.1fs: %s",
        source,
        out,
        time.perf_counter() - started,
        json.dumps(summary),
    )
    return report


def _split_order(name: str) -> tuple[int, str]:
    return (SPLIT_NAMES.index(name) if name in SPLIT_NAMES else len(SPLIT_NAMES), name)


def _image_reason(kind: str, status: str) -> str:
    return f"{kind}.{status}"


# ------------------------------------------------------------------------------------- MIMIC


@dataclass(slots=True)
class _MimicEntity:
    key: int
    id: str
    name: str
    attributes: str
    images: list[str]


@dataclass(slots=True)
class _MimicMention:
    id: str
    split: str
    mention: str
    sentence: str
    entity_id: str | None
    image: str | None  # file name inside the mention image folder


def _resolve_input(src: Path, value: str | os.PathLike[str] | None, default: str) -> Path:
    if value is None:
        return src / default
    path = Path(value)
    if not path.is_absolute() and not path.exists() and (src / path).exists():
        return src / path
    return path


_SPLIT_WORDS = {"train": ("train",), "dev": ("dev", "val"), "test": ("test",)}


def _detect_split_files(src: Path, exclude: set[Path], skip: set[str]) -> dict[str, Path]:
    """``*train*.json``, ``*dev*.json`` (or ``*val*``), ``*test*.json`` in ``src``, for the
    splits not in ``skip`` (those named explicitly), ignoring the files in ``exclude``."""
    found: dict[str, Path] = {}
    candidates = sorted(p for p in src.glob("*.json") if p.resolve() not in exclude)
    for split, words in _SPLIT_WORDS.items():
        if split in skip:
            continue
        hits = [p for p in candidates if any(w in p.stem.lower() for w in words)]
        if len(hits) > 1:
            raise ValueError(
                f"several {split} files in {src}: {[p.name for p in hits]}; "
                f"name the one to use (split_files / --{split})"
            )
        if hits:
            found[split] = hits[0]
    return found


def _mimic_image_candidates(img_path: str) -> list[str]:
    """File names to look for in the mention image folder, the authors' mapping first
    (``img_name.split('/')[-1].split('.')[0] + '.jpg'``), then the stem and the name as is."""
    base = img_path.replace("\\", "/").split("/")[-1]
    names = [base.split(".")[0] + ".jpg", base.rsplit(".", 1)[0] + ".jpg", base]
    return [n for n in dict.fromkeys(names) if _safe_relpath(n) and n != ".jpg"]


def _read_mimic_entities(
    kb_path: Path,
    qid2id_path: Path,
    report: RecordReport,
) -> list[_MimicEntity]:
    raw_qid2id = _load_json(qid2id_path, report, "qid2id")
    if not isinstance(raw_qid2id, dict):
        raise ValueError(f"{qid2id_path}: expected a JSON object QID -> id")
    id2qid: dict[int, str] = {}
    for qid, raw_id in raw_qid2id.items():
        key = _as_int(raw_id)
        if key is None or not qid.strip():
            report.add("qid2id.bad_entry", f"{qid!r}: {raw_id!r}")
            continue
        if key in id2qid:
            report.add("qid2id.duplicate_id", f"id={key}: {id2qid[key]} and {qid}")
            continue
        id2qid[key] = qid

    raw_kb = _load_json(kb_path, report, "entity")
    if not isinstance(raw_kb, list):
        raise ValueError(f"{kb_path}: expected a JSON list of entities")
    entities: dict[int, _MimicEntity] = {}
    for index, obj in enumerate(raw_kb):
        where = f"{kb_path.name}[{index}]"
        if not isinstance(obj, dict):
            report.add("entity.missing_field", f"{where}: not an object")
            continue
        key = _as_int(obj.get("id"))
        raw_name = obj.get("entity_name")
        name = unquote(raw_name).strip() if isinstance(raw_name, str) else ""
        if key is None or not name:
            report.add("entity.missing_field", f"{where} id={obj.get('id')!r} name={raw_name!r}")
            continue
        if obj.get("type", "entity") != "entity":
            report.add("entity.bad_type", f"{where} id={key} type={obj.get('type')!r}")
            continue
        if key in entities:
            report.add("entity.duplicate_id", f"{where} id={key}")
            continue
        attributes = obj.get("attr")
        if not isinstance(attributes, str):
            report.add("entity.missing_attributes", f"{where} id={key}")
            attributes = ""
        image_list = obj.get("image_list", [])
        if not isinstance(image_list, list):
            report.add("entity.bad_image_list", f"{where} id={key}")
            image_list = []
        images: list[str] = []
        for name_in_list in image_list:
            rel = _safe_relpath(name_in_list) if isinstance(name_in_list, str) else None
            if rel is None:
                report.add("entity.bad_image_path", f"{where} id={key} {name_in_list!r}")
                continue
            images.append(rel)
        qid = id2qid.get(key)
        if qid is None:
            report.add("entity.no_qid", f"{where} id={key} name={name}")
            qid = f"id:{key}"
        entities[key] = _MimicEntity(key, qid, name, attributes, images)
    # The authors sort by id; rows then line up with their int ids.
    return [entities[k] for k in sorted(entities)]


def _read_mimic_mentions(
    split_files: dict[str, Path], known: set[str], mention_dir: Path, report: RecordReport
) -> list[_MimicMention]:
    mentions: list[_MimicMention] = []
    seen: set[str] = set()
    # One directory listing instead of a stat per candidate name.
    available = (
        {e.name for e in os.scandir(mention_dir) if e.is_file()} if mention_dir.is_dir() else set()
    )
    for split, path in split_files.items():
        raw = _load_json(path, report, "mention")
        if not isinstance(raw, list):
            raise ValueError(f"{path}: expected a JSON list of mentions")
        for index, obj in enumerate(raw):
            where = f"{path.name}[{index}]"
            if not isinstance(obj, dict):
                report.add("mention.not_an_object", where)
                continue
            raw_mention, sentence, answer = (
                obj.get("mentions"),
                obj.get("sentence"),
                obj.get("answer"),
            )
            surface = unquote(raw_mention).strip() if isinstance(raw_mention, str) else ""
            if (
                not surface
                or not isinstance(sentence, str)
                or not isinstance(answer, str)
                or not answer.strip()
            ):
                report.add("mention.missing_field", f"{where} id={obj.get('id')!r}")
                continue
            gold = None if answer.strip().lower() == _NIL else answer.strip()
            if gold is not None and gold not in known:
                report.add("mention.unknown_entity", f"{where} id={obj.get('id')!r} answer={gold}")
                continue
            mid = _as_id(obj.get("id")) or f"{split}-{index}"
            if mid in seen:
                new_id = f"{split}-{index}"
                while new_id in seen:
                    new_id += "'"
                report.add("mention.duplicate_id", f"{where} id={mid} -> {new_id}")
                mid = new_id
            seen.add(mid)
            image = None
            img_path = obj.get("imgPath")
            if img_path is not None and not isinstance(img_path, str):
                report.add("mention.bad_image_path", f"{where} id={mid} imgPath={img_path!r}")
            elif img_path:
                names = _mimic_image_candidates(img_path)
                if not names:
                    report.add("mention.bad_image_path", f"{where} id={mid} imgPath={img_path!r}")
                else:
                    # the first name that exists; else the authors' name, which checks as missing
                    image = next((n for n in names if n in available), names[0])
            mentions.append(_MimicMention(mid, split, surface, sentence, gold, image))
    return mentions


def convert_mimic(
    src: Path,
    out: Path,
    *,
    kb_file: str | os.PathLike[str] | None = None,
    qid2id_file: str | os.PathLike[str] | None = None,
    split_files: dict[str, str] | None = None,
    kb_image_dir: str | os.PathLike[str] | None = None,
    mention_image_dir: str | os.PathLike[str] | None = None,
    copy_images: bool = False,
) -> RecordReport:
    """Convert the MIMIC authors' cleaned layout at ``src`` into a canonical dataset at ``out``.

    Entity ids become QIDs (qid2id inverted), names and mentions are URL-unquoted, "nil"
    answers become NIL mentions (``entity_id=None``). Unset inputs default to the authors'
    names under ``src``; split files not given are auto-detected by name.
    """
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    report, stats = RecordReport(), _Stats()
    kb_path = _require_file(_resolve_input(src, kb_file, "kb_entity.json"), "entity file")
    qid2id_path = _require_file(_resolve_input(src, qid2id_file, "qid2id.json"), "qid2id file")
    kb_dir = _resolve_input(src, kb_image_dir, "kb_image")
    mention_dir = _resolve_input(src, mention_image_dir, "mention_image")
    given = {
        split: _require_file(_resolve_input(src, value, value), f"{split} file")
        for split, value in (split_files or {}).items()
    }
    taken = {kb_path.resolve(), qid2id_path.resolve(), *(p.resolve() for p in given.values())}
    splits_in = {**_detect_split_files(src, taken, skip=set(given)), **given}
    if not splits_in:
        logger.warning("no split files found in %s: the dataset will have no mentions", src)
    _prepare_out(src, out)

    raw_entities = _read_mimic_entities(kb_path, qid2id_path, report)
    known = {e.id for e in raw_entities}
    raw_mentions = _read_mimic_mentions(splits_in, known, mention_dir, report)

    for folder, what in ((kb_dir, "entity image"), (mention_dir, "mention image")):
        if not folder.is_dir():
            logger.warning("%s folder %s does not exist", what, folder)
    status = _check_images(
        [kb_dir / rel for e in raw_entities for rel in e.images]
        + [mention_dir / m.image for m in raw_mentions if m.image],
        stats,
    )
    kb_used = [rel for e in raw_entities for rel in e.images if status[kb_dir / rel] == _OK]
    mention_used = [
        m.image for m in raw_mentions if m.image and status[mention_dir / m.image] == _OK
    ]
    kb_failed = _place_images(out, KB_IMAGES, kb_dir, kb_used, copy_images, stats)
    mention_failed = _place_images(
        out, MENTION_IMAGES, mention_dir, mention_used, copy_images, stats
    )
    if mention_dir.is_dir():
        n_files = sum(1 for entry in os.scandir(mention_dir) if entry.is_file())
        stats.unused_source_images = n_files - len(set(mention_used))

    stats.extra["entities_with_image"] = 0

    def entities() -> Iterator[Entity]:
        for e in raw_entities:
            images = []
            for rel in e.images:
                st = status[kb_dir / rel]
                if st != _OK:
                    report.add(_image_reason("entity", st), f"id={e.id} {kb_dir / rel}")
                elif rel in kb_failed:
                    report.add("entity.copy_failed", f"id={e.id} {kb_dir / rel}")
                else:
                    images.append(f"{KB_IMAGES}/{rel}")
            stats.extra["entities_with_image"] += bool(images)
            yield Entity(id=e.id, name=e.name, attributes=e.attributes, images=tuple(images))

    mentions: list[Mention] = []
    splits: dict[str, list[str]] = {s: [] for s in sorted(splits_in, key=_split_order)}
    for m in raw_mentions:
        image = None
        if m.image:
            st = status[mention_dir / m.image]
            if st != _OK:
                report.add(_image_reason("mention", st), f"id={m.id} {mention_dir / m.image}")
            elif m.image in mention_failed:
                report.add("mention.copy_failed", f"id={m.id} {mention_dir / m.image}")
            else:
                image = f"{MENTION_IMAGES}/{m.image}"
        span = stats.span(m.mention, m.sentence)
        if span is None:
            report.add("mention.no_span", f"id={m.id} {m.mention!r} in {m.sentence!r}")
        mentions.append(
            Mention(
                id=m.id,
                mention=m.mention,
                sentence=m.sentence,
                span=span,
                image=image,
                entity_id=m.entity_id,
            )
        )
        splits[m.split].append(m.id)
    # kb.jsonl is streamed from the generator; entity image problems are counted as it runs,
    # before meta.json (with the report) is written.
    return _finish(
        out,
        name=src.resolve().name,
        source=f"mimic:{src}",
        entities=entities(),
        mentions=mentions,
        splits=splits,
        report=report,
        stats=stats,
        copy=copy_images,
        started=started,
    )


# ---------------------------------------------------------------------------------- MELBench


def _read_melbench_kb(src: Path, report: RecordReport) -> list[Entity]:
    qid2abs = _load_json(_require_file(src / "qid2abs.json", "qid2abs.json"), report, "entity")
    qid2ne = _load_json(_require_file(src / "qid2ne.json", "qid2ne.json"), report, "entity")
    for path, obj in (("qid2abs.json", qid2abs), ("qid2ne.json", qid2ne)):
        if not isinstance(obj, dict):
            raise ValueError(f"{src / path}: expected a JSON object QID -> text")
    entities: list[Entity] = []
    for qid, abstract in qid2abs.items():
        name = qid2ne.get(qid)
        if not qid.strip() or not isinstance(name, str) or not name.strip():
            report.add("entity.missing_field", f"qid2abs.json {qid!r}: name={name!r}")
            continue
        if not isinstance(abstract, str):
            report.add("entity.missing_attributes", f"{qid}: {abstract!r}")
            abstract = ""
        entities.append(Entity(id=qid, name=name, attributes=abstract))
    for qid in qid2ne:
        if qid not in qid2abs:
            report.add("entity.name_without_attributes", f"{qid} {qid2ne[qid]!r}")
    return entities


def convert_melbench(src: Path, out: Path, *, copy_images: bool = False) -> RecordReport:
    """Convert MELBench ``Wikidata-MEL.json`` + the MEL-GHMFC side files at ``src`` into a
    canonical dataset at ``out``.

    Each element of a sample's ``mentions`` becomes a mention ``<sample id>-<k>`` with gold
    ``answer[k]``; the sample's image (``mention_images/<sample id>.jpg``, when present) is
    shared by all its mentions; splits list the mention ids of their sample ids.
    """
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    report, stats = RecordReport(), _Stats()
    data_path = _require_file(src / "Wikidata-MEL.json", "Wikidata-MEL.json")
    splits_path = _require_file(src / "splits.json", "splits.json")
    image_dir = src / "mention_images"
    _prepare_out(src, out)

    entities = _read_melbench_kb(src, report)
    known = {e.id for e in entities}
    samples = _load_json(data_path, report, "sample")
    if not isinstance(samples, dict):
        raise ValueError(f"{data_path}: expected a JSON object sample id -> sample")
    available = (
        {e.name for e in os.scandir(image_dir) if e.is_file()} if image_dir.is_dir() else set()
    )

    # (mention, sample key, image file name or None)
    pending: list[tuple[Mention, str, str | None]] = []
    for key, sample in samples.items():
        if not isinstance(sample, dict):
            report.add("sample.not_an_object", f"{key}")
            continue
        sample_id = _as_id(sample.get("id"))
        if sample_id is not None and sample_id != key:
            report.add("sample.id_mismatch", f"key={key} id={sample_id}")
        sentence, surfaces, answers = (
            sample.get("sentence"),
            sample.get("mentions"),
            sample.get("answer"),
        )
        if (
            not isinstance(sentence, str)
            or not isinstance(surfaces, list)
            or not isinstance(answers, list)
        ):
            missing = [k for k in ("sentence", "mentions", "answer") if k not in sample]
            report.add("sample.missing_field", f"{key}: missing/bad {missing or 'types'}")
            continue
        if len(surfaces) != len(answers):
            report.add(
                "sample.length_mismatch", f"{key}: {len(surfaces)} mentions, {len(answers)} answers"
            )
            continue
        if not surfaces:
            report.add("sample.no_mentions", key)
            continue
        image_name = f"{key}.jpg"
        image = image_name if image_name in available and _safe_relpath(image_name) else None
        for k, (surface, answer) in enumerate(zip(surfaces, answers, strict=True)):
            mid = f"{key}-{k}"
            surface = surface.strip() if isinstance(surface, str) else surface
            if (
                not isinstance(surface, str)
                or not surface
                or not isinstance(answer, str)
                or not answer.strip()
            ):
                report.add("mention.missing_field", f"{mid}: {surface!r} -> {answer!r}")
                continue
            gold = None if answer.strip().lower() == _NIL else answer.strip()
            if gold is not None and gold not in known:
                report.add("mention.unknown_entity", f"{mid}: {surface!r} -> {gold}")
                continue
            span = stats.span(surface, sentence)
            if span is None:
                report.add("mention.no_span", f"{mid}: {surface!r} in {sentence!r}")
            pending.append(
                (
                    Mention(id=mid, mention=surface, sentence=sentence, span=span, entity_id=gold),
                    key,
                    image,
                )
            )

    status = _check_images([image_dir / img for _, _, img in pending if img], stats)
    used = sorted({img for _, _, img in pending if img and status[image_dir / img] == _OK})
    failed = _place_images(out, MENTION_IMAGES, image_dir, used, copy_images, stats)
    stats.unused_source_images = len(available) - len(used)

    mentions: list[Mention] = []
    by_sample: dict[str, list[str]] = {}
    for m, key, img in pending:
        if img:
            st = status[image_dir / img]
            if st != _OK:
                report.add(_image_reason("mention", st), f"id={m.id} {image_dir / img}")
            elif img in failed:
                report.add("mention.copy_failed", f"id={m.id} {image_dir / img}")
            else:
                m = Mention(
                    m.id, m.mention, m.sentence, m.span, f"{MENTION_IMAGES}/{img}", m.entity_id
                )
        mentions.append(m)
        by_sample.setdefault(key, []).append(m.id)

    raw_splits = _load_json(splits_path, report, "split")
    if not isinstance(raw_splits, dict):
        raise ValueError(f"{splits_path}: expected a JSON object split -> sample ids")
    splits: dict[str, list[str]] = {}
    assigned: dict[str, str] = {}
    for split, sample_ids in raw_splits.items():
        splits[split] = []
        if not isinstance(sample_ids, list):
            report.add("split.bad_list", f"{split}: {type(sample_ids).__name__}")
            continue
        for raw_sid in sample_ids:
            sid = _as_id(raw_sid)
            if sid is None or sid not in samples:
                report.add("split.unknown_sample", f"{split}: {raw_sid!r}")
                continue
            if sid in assigned:
                report.add("split.duplicate_sample", f"{split}: {sid} (already in {assigned[sid]})")
                continue
            assigned[sid] = split
            # Samples dropped above (and mentions left out) contribute nothing here; they were
            # counted where they were dropped.
            splits[split].extend(by_sample.get(sid, []))
    for key in by_sample:
        if key not in assigned:
            report.add("sample.not_in_split", key)
    # train / dev / test first, whatever order the file has them in
    splits = {s: splits[s] for s in sorted(splits, key=_split_order)}
    stats.extra.update(
        {f"{s}_samples": sum(1 for v in assigned.values() if v == s) for s in splits}
    )
    missing_splits = [s for s in SPLIT_NAMES if s not in splits]
    if missing_splits:
        logger.warning("%s has no %s split", splits_path, missing_splits)
    stats.extra["samples"] = len(samples)
    return _finish(
        out,
        name=src.resolve().name,
        source=f"melbench:{src}",
        entities=entities,
        mentions=mentions,
        splits=splits,
        report=report,
        stats=stats,
        copy=copy_images,
        started=started,
    )


__all__ = [
    "KB_IMAGES",
    "MAX_GAP_WORDS",
    "MENTION_IMAGES",
    "convert_melbench",
    "convert_mimic",
    "gapped_span",
]
