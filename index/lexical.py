"""The lexical candidate channel: a character-trigram TF-IDF index over entity names and aliases.

Dense retrieval misses entities that a fuzzy name match finds (namesakes, partial and misspelt
names); this channel finds them by the cosine of idf-weighted character-trigram sets, the
normalisation being :func:`models.lexical.norm_name` (one place for the index, the bench and
the ranker). Every entity contributes one *name entry* per distinct normalised name or alias;
an entity's score is the best over its entries.

On disk, ``<index>/lexical/`` (plain ``.npy`` arrays, memory-mapped by the reader)::

    grams.npy      int64 (G,)    sorted gram keys: a trigram's three code points packed into
                                 21 bits each (exact and collision-free, so no vocabulary dict)
    idf.npy        float32 (G,)  log((1 + E) / (1 + df)) + 1, df = name entries holding the gram
    indptr.npy     int64 (G+1,)  postings of gram g: [indptr[g], indptr[g+1])
    postings.npy   int32 (P,)    name entries holding each gram, ascending (int64 past 2^31)
    weights.npy    float32 (P,)  idf / ||entry||: the entry's L2-normalised tf-idf weight
    entry_row.npy  int64 (E,)    entity row of each name entry (non-decreasing)
    meta.json      counts and the formulas above; written last, so a folder with it is complete

Term frequencies are binary (a name's trigram *set*, like :func:`models.lexical.trigram_cosine`),
so a score is the cosine of two idf-weighted binary vectors, in [0, 1].

The index job builds it (:func:`build_lexical`) after finalizing a folder and again after every
``add``: a rebuild streams ``entities.jsonl`` (O(N), no model, no re-encoding), which is simple
and keeps df/idf exact; ``mel-index lexical --index DIR`` builds it for a folder made before.
Building holds every (gram, entry) pair in memory (~15 per name, ~50 bytes each at the
peak of the sort): a few GB for tens of millions of names; an external sort would lift that.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.store import ENTITIES_FILE, Manifest
from models.lexical import (
    gram_keys,
    norm_name,
    pack_trigrams,
    padded_code_points,
    sorted_distinct,
)

logger = logging.getLogger(__name__)

LEXICAL_DIR = "lexical"
LEXICAL_FORMAT = "mel-lexical"
LEXICAL_VERSION = 1
META_FILE = "meta.json"
# Postings.top sums a query's postings in one slot per name entry (not by sorting them) when
# it gathered at least 1/DENSE_ACCUMULATE as many postings as there are entries.
DENSE_ACCUMULATE = 32
_ARRAYS = ("grams", "idf", "indptr", "postings", "weights", "entry_row")
_BLOCK = 65_536  # names turned into (gram, entry) pairs at a time


def _block_pairs(norms: Sequence[str], first_entry: int) -> tuple[np.ndarray, np.ndarray]:
    """(gram key, entry) pairs of a block of non-empty normalised names, one per distinct gram."""
    cp, starts = padded_code_points(norms)
    keys = pack_trigrams(cp)
    # gram j starts at character j; it belongs to the name it starts in if it ends inside it
    owner = np.repeat(np.arange(len(norms), dtype=np.int64), np.diff(np.r_[starts, len(cp)]))
    j = np.arange(len(keys))
    inside = owner[j] == owner[j + 2]
    keys, entries = keys[inside], owner[: len(keys)][inside] + first_entry
    order = np.lexsort((keys, entries))
    keys, entries = keys[order], entries[order]
    first = np.r_[True, (keys[1:] != keys[:-1]) | (entries[1:] != entries[:-1])]
    return keys[first], entries[first]


def _iter_names(folder: Path, entity_count: int) -> Iterator[tuple[int, list[str]]]:
    """(row, [name, *aliases]) of the first ``entity_count`` rows of ``entities.jsonl``."""
    with open(folder / ENTITIES_FILE, encoding="utf-8") as f:
        for row, line in enumerate(f):
            if row == entity_count:
                break
            obj = json.loads(line)
            yield row, [obj["name"], *obj.get("aliases", ())]


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Move a finished ``tmp`` folder to ``dst``. Two renames: an open reader keeps its
    memory-mapped (now unlinked) files; one opening in between finds no index, never half one."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


IdfOf = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Postings:
    """Gram -> name-entry postings with each entry's L2-normalised idf weight (the arrays of
    the module docstring, memory-mapped from disk or built in memory)."""

    grams: np.ndarray
    idf: np.ndarray
    indptr: np.ndarray
    postings: np.ndarray
    weights: np.ndarray
    entry_row: np.ndarray

    @classmethod
    def from_pairs(
        cls,
        keys: np.ndarray,
        entries: np.ndarray,
        entry_row: np.ndarray,
        idf_of: IdfOf | None = None,
    ) -> Postings:
        """Postings of (gram key, entry) pairs. ``idf_of(grams, df)`` gives each gram's idf;
        None = this collection's own, ``log((1 + E) / (1 + df)) + 1``."""
        n_entries = len(entry_row)
        order = np.lexsort((entries, keys))  # by gram, then entry
        keys, entries = keys[order], entries[order]
        del order
        grams, gram_of, df = np.unique(keys, return_inverse=True, return_counts=True)
        if idf_of is None:
            idf = (np.log((1.0 + n_entries) / (1.0 + df)) + 1.0).astype(np.float32)
        else:
            idf = np.asarray(idf_of(grams, df), dtype=np.float32)
        w = idf[gram_of].astype(np.float64)
        norm = np.sqrt(np.bincount(entries, weights=w * w, minlength=n_entries))
        weights = (w / norm[entries]).astype(np.float32)
        post_dtype = np.int32 if n_entries < 2**31 else np.int64
        return cls(
            grams=grams.astype(np.int64),
            idf=idf,
            indptr=np.concatenate([[0], np.cumsum(df)]).astype(np.int64),
            postings=entries.astype(post_dtype),
            weights=weights,
            entry_row=entry_row,
        )

    @classmethod
    def of_names(cls, names: Sequence[tuple[int, Sequence[str]]], idf_of: IdfOf) -> Postings:
        """In-memory postings of ``(row, [name, *aliases])`` pairs weighted by ``idf_of``: a
        small collection scored on another's idf (the live entities of an index folder)."""
        norms: list[str] = []
        entry_row: list[int] = []
        for row, ns in names:
            for n in dict.fromkeys(norm_name(x) for x in ns):
                if n:
                    norms.append(n)
                    entry_row.append(row)
        if not norms:
            z = np.zeros(0, np.int64)
            return cls(
                z, np.zeros(0, np.float32), np.zeros(1, np.int64), z, z.astype(np.float32), z
            )
        keys, entries = _block_pairs(norms, 0)
        return cls.from_pairs(keys, entries, np.asarray(entry_row, dtype=np.int64), idf_of)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _ARRAYS}

    def top(
        self, keys: np.ndarray, qw: np.ndarray, k: int, skip_df: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (rows, scores) for a query's gram ``keys`` with weights ``qw``: the best
        entry of each row; grams held by more than ``skip_df`` entries are skipped (but at
        least the rarest one is kept)."""
        none = np.zeros(0, np.int64), np.zeros(0, np.float32)
        if not len(keys) or not len(self.grams):
            return none
        pos = np.minimum(np.searchsorted(self.grams, keys), len(self.grams) - 1)
        found = self.grams[pos] == keys
        pos, qw = pos[found], qw[found]
        if not len(pos):
            return none
        lo, hi = self.indptr[pos], self.indptr[pos + 1]
        keep = (hi - lo) <= skip_df
        if not keep.any():
            keep = (hi - lo) == (hi - lo).min()
        lo, hi, qw = lo[keep], hi[keep], qw[keep]
        entries = np.concatenate([self.postings[s:e] for s, e in zip(lo, hi, strict=True)])
        contrib = np.concatenate(
            [self.weights[s:e] for s, e in zip(lo, hi, strict=True)]
        ) * np.repeat(qw, hi - lo)
        n_entries = len(self.entry_row)
        if len(entries) * DENSE_ACCUMULATE >= n_entries:
            # one slot per entry beats sorting the gathered postings (a small KB, or a query
            # of frequent grams); the same sums in the same order, so the same scores
            acc = np.bincount(entries, weights=contrib, minlength=n_entries)
            # the entries gathered, sorted: a sort of the postings, not a scan of every slot
            # (the scan was most of a one-query search once the flat search had evicted it)
            uniq = sorted_distinct(entries)
            per_entry = acc[uniq]
        else:
            uniq, inv = np.unique(entries, return_inverse=True)
            per_entry = np.bincount(inv, weights=contrib)
        # entries are numbered in row order: a row's entries are adjacent in ``uniq``
        rows = np.asarray(self.entry_row[uniq])
        same = rows[1:] == rows[:-1]  # a row's entries are adjacent
        if not same.any():  # one name per row among these (no aliases)
            score = per_entry
        else:
            first = np.flatnonzero(np.concatenate(([True], ~same)))
            rows, score = rows[first], np.maximum.reduceat(per_entry, first)
        if len(rows) > k:
            top = np.argpartition(-score, k - 1)[:k]
            rows, score = rows[top], score[top]
        order = np.lexsort((rows, -score))  # best first, ties by row
        return rows[order], np.minimum(score[order], 1.0).astype(np.float32)


def build_lexical(folder: str | os.PathLike[str], entity_count: int) -> dict[str, int]:
    """(Re)build ``<folder>/lexical/`` from the first ``entity_count`` rows of the folder's
    ``entities.jsonl``, atomically (a ``.tmp`` folder renamed); returns the manifest's record
    ``{"entries", "grams", "postings"}``."""
    t0 = time.perf_counter()
    folder = Path(folder)
    entry_row: list[int] = []
    key_parts: list[np.ndarray] = []
    entry_parts: list[np.ndarray] = []
    block: list[str] = []
    rows_read = 0
    for row, names in _iter_names(folder, entity_count):
        rows_read += 1
        seen: set[str] = set()
        for name in names:
            n = norm_name(name)
            if n and n not in seen:  # one entry per distinct normalised name
                seen.add(n)
                block.append(n)
                entry_row.append(row)
        if len(block) >= _BLOCK:
            k, e = _block_pairs(block, len(entry_row) - len(block))
            key_parts.append(k)
            entry_parts.append(e)
            block = []
    if block:
        k, e = _block_pairs(block, len(entry_row) - len(block))
        key_parts.append(k)
        entry_parts.append(e)
    if rows_read != entity_count:
        raise ValueError(f"{folder / ENTITIES_FILE} has {rows_read} rows, the index {entity_count}")
    n_entries = len(entry_row)
    keys = np.concatenate(key_parts) if key_parts else np.zeros(0, np.int64)
    entries = np.concatenate(entry_parts) if entry_parts else np.zeros(0, np.int64)
    del key_parts, entry_parts
    post = Postings.from_pairs(keys, entries, np.asarray(entry_row, dtype=np.int64))
    del keys, entries
    arrays = post.arrays()
    grams = post.grams
    record = {"entries": n_entries, "grams": len(grams), "postings": len(post.postings)}
    meta = {
        "format": LEXICAL_FORMAT,
        "version": LEXICAL_VERSION,
        "entities": entity_count,
        **record,
        "n": 3,
        "normalisation": "models.lexical.norm_name",
        "gram_key": "(c0 << 42) | (c1 << 21) | c2 of the code points of ' ' + name + ' '",
        "tf": "binary",
        "idf": "log((1 + entries) / (1 + df)) + 1",
    }
    out = folder / LEXICAL_DIR
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    _replace_dir(tmp, out)
    logger.info(
        "lexical index %s: %d name entries of %d entities, %d grams, %d postings in %.1fs",
        out,
        n_entries,
        entity_count,
        len(grams),
        len(post.postings),
        time.perf_counter() - t0,
    )
    return record


def rebuild_lexical(folder: str | os.PathLike[str]) -> Manifest:
    """Build the lexical index of an existing index folder and record it in its manifest
    (``mel-index lexical``): folders built before the channel existed gain it, no re-encoding."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    manifest.lexical = build_lexical(folder, manifest.entity_count)
    manifest.save(folder)
    return manifest


def has_lexical(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a complete lexical index."""
    return (Path(folder) / LEXICAL_DIR / META_FILE).is_file()


class LexicalIndex:
    """Reader of ``<index>/lexical/``: top-k entity rows by trigram tf-idf cosine of their names.

    Speed: a query gathers the postings of its ~len(name) grams. A gram held by more than
    ``skip_df_share`` of all name entries *and* more than ``skip_df_min`` of them (a frequent
    trigram of a large KB, " jo" or "an ") is skipped: it costs the most and tells the least
    (lowest idf). It still counts in the query's norm, so scores then are a lower bound of the
    cosine. If every gram of a query is that frequent, its rarest one is kept.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        skip_df_share: float = 0.2,
        skip_df_min: int = 10_000,
    ) -> None:
        self.folder = Path(folder) / LEXICAL_DIR
        meta = json.loads((self.folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != LEXICAL_FORMAT or meta.get("version", 0) > LEXICAL_VERSION:
            raise ValueError(f"{self.folder}: not a {LEXICAL_FORMAT} v<={LEXICAL_VERSION} index")
        self.meta: dict[str, Any] = meta
        # plain ndarrays over the maps (np.memmap indexes through Python: ~27 reads a query)
        self.post = Postings(
            **{
                n: np.load(self.folder / f"{n}.npy", mmap_mode="r").view(np.ndarray)
                for n in _ARRAYS
            }
        )
        self.grams, self.idf = self.post.grams, self.post.idf
        self.entities = int(meta["entities"])
        n_entries = len(self.post.entry_row)
        self.skip_df = max(skip_df_share * n_entries, skip_df_min)
        # the idf of a gram no name has (df = 0): it still counts in the query's norm
        self.unknown_idf = math.log(1.0 + n_entries) + 1.0

    def __len__(self) -> int:
        """Name entries (distinct normalised names and aliases)."""
        return len(self.post.entry_row)

    def idf_of(self, grams: np.ndarray, df: np.ndarray | None = None) -> np.ndarray:
        """This index's idf of each gram key (``unknown_idf`` for grams no name has)."""
        if not len(self.grams):
            return np.full(len(grams), self.unknown_idf)
        pos = np.minimum(np.searchsorted(self.grams, grams), len(self.grams) - 1)
        return np.where(self.grams[pos] == grams, self.idf[pos], self.unknown_idf)

    def query(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """A query's gram keys and their L2-normalised weights under this index's idf."""
        keys = gram_keys(query)
        if not len(keys):
            return keys, np.zeros(0)
        idf = self.idf_of(keys).astype(np.float64)
        return keys, idf / np.sqrt(np.sum(idf * idf))

    def _one(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        keys, qw = self.query(query)
        return self.post.top(keys, qw, k, self.skip_df)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` entity rows for each query string: ``rows`` (B, k) int64, -1 where fewer
        than k entities share a gram with the query; ``scores`` (B, k) float32 cosines in
        [0, 1], 0 at the padding; best first."""
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        if k <= 0:
            return rows, scores
        for b, q in enumerate(queries):
            r, s = self._one(q, k)
            rows[b, : len(r)], scores[b, : len(s)] = r, s
        return rows, scores


__all__ = [
    "LEXICAL_DIR",
    "LexicalIndex",
    "Postings",
    "build_lexical",
    "gram_keys",
    "has_lexical",
    "rebuild_lexical",
]
