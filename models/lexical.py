"""Name normalisation and string features of mention/candidate-name pairs: pure functions.

One place for what the lexical channel compares, shared by the index job's trigram index
(:mod:`index.lexical`), the benchmarks (``bench/wikimel.py``) and the fusion ranker, so that a
name is normalised the same way when it is indexed, when it is queried and when it is scored
(train/serve skew is the classic bug of this field).

* :func:`norm_name`, :func:`name_tokens`, :func:`char_ngrams`: casefolded, accent-free names,
  their word tokens and their character n-grams (moved unchanged from ``bench/wikimel.py``).
* :func:`trigram_cosine`, :func:`containment`: two similarities of one pair.
* :func:`name_features`: ``(K, F)`` features of one mention against K candidates, each given as
  its name followed by its aliases; the columns are named by :data:`NAME_FEATURES`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from rapidfuzz import fuzz, process

from models.data.schema import find_span

# ----------------------------------------------------------------------- normalisation
_PAREN = re.compile(r"\s*\([^)]*\)\s*$")
_WORD = re.compile(r"\w+")


def norm_name(s: str) -> str:
    """casefold, accents stripped, a trailing "(qualifier)" dropped, whitespace collapsed."""
    s = _PAREN.sub("", s)
    return " ".join(_strip_accents(s).casefold().split())


def _strip_accents(s: str) -> str:
    if s.isascii():  # NFKD leaves ASCII as it is and it has no combining marks: 5x faster
        return s
    s = unicodedata.normalize("NFKD", s)
    return "".join(c for c in s if not unicodedata.combining(c))


def name_tokens(s: str) -> list[str]:
    return re.findall(r"\w+", norm_name(s))


def char_ngrams(s: str, n: int = 3) -> list[str]:
    t = f" {norm_name(s)} "
    return [t[i : i + n] for i in range(max(1, len(t) - n + 1))]


def text_tokens(s: str) -> list[str]:
    """Word tokens of running text, folded like :func:`norm_name` but keeping a trailing
    parenthesis (a sentence's "(2004)" is words, not a name's qualifier)."""
    return _WORD.findall(_strip_accents(s).casefold())


# ---------------------------------------------------------------------------- pair scores
def _set_cosine(a: AbstractSet[str], b: AbstractSet[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / math.sqrt(len(a) * len(b))


def trigram_cosine(a: str, b: str) -> float:
    """Cosine of the binary character-trigram sets of two names (``|A & B| / sqrt(|A| |B|)``);
    0 when either name normalises to nothing."""
    if not norm_name(a) or not norm_name(b):
        return 0.0
    return _set_cosine(set(char_ngrams(a)), set(char_ngrams(b)))


def containment(a_tokens: Iterable[str], b_tokens: Iterable[str]) -> float:
    """Share of ``a``'s distinct tokens that occur in ``b`` (0 when ``a`` has none)."""
    a, b = set(a_tokens), set(b_tokens)
    return len(a & b) / len(a) if a else 0.0


# ------------------------------------------------------------------------- name features
NAME_FEATURES: tuple[str, ...] = (
    "trigram_cosine",  # char-trigram set cosine of the normalised names
    "mention_in_name",  # share of the mention's tokens found in the name
    "name_in_mention",  # share of the name's tokens found in the mention
    "exact",  # normalised names equal
    "prefix",  # one token sequence starts the other ("George W." / "George W. Bush")
    "last_token",  # same last token ("Biden" / "Joe Biden")
    "first_token",  # same first token
    "edit_ratio",  # rapidfuzz fuzz.ratio / 100 (normalised indel similarity)
    "edit_token_set",  # rapidfuzz fuzz.token_set_ratio / 100 (word order and extras ignored)
    "other_in_sentence",  # share of the name's tokens elsewhere in the sentence, not in mention
    "name_tokens_count",  # tokens of the candidate's primary name
    "ambiguity",  # candidates in the list whose name or an alias holds every mention token
    "ambiguity_share",  # ambiguity / K
)
_COL = {f: i for i, f in enumerate(NAME_FEATURES)}
# what a candidate's name and aliases contribute, best (max) over them
_PER_VARIANT = NAME_FEATURES[: _COL["other_in_sentence"] + 1]


@dataclass(frozen=True, slots=True)
class _Name:
    """One analysed name: normalised string, tokens, token set, trigram set."""

    norm: str
    tokens: tuple[str, ...]
    token_set: frozenset[str]
    grams: frozenset[str]
    n_set: int  # len(token_set)
    n_grams: int  # len(grams)


ANALYSED = 1 << 16  # names whose analysis is kept (LRU): a KB's names and its mentions


@lru_cache(maxsize=ANALYSED)  # candidate names recur across mentions; analysed once
def _analyse(s: str) -> _Name:
    n = norm_name(s)
    tokens = tuple(_WORD.findall(n))  # == name_tokens(s), without normalising twice
    t = f" {n} "  # == char_ngrams(s)
    grams = frozenset(t[i : i + 3] for i in range(max(1, len(t) - 2))) if n else frozenset()
    token_set = frozenset(tokens)
    return _Name(n, tokens, token_set, grams, len(token_set), len(grams))


def analyse_names(names: Iterable[str]) -> int:
    """Analyse names ahead of the requests that will score them (the analysis LRU keeps the
    last :data:`ANALYSED` names seen); returns how many were given."""
    n = 0
    for s in names:
        _analyse(s)
        n += 1
    return n


def _outside_tokens(mention: str, sentence: str, span: tuple[int, int] | None) -> set[str]:
    """Tokens of the sentence outside the mention's span (the given span, else the mention's
    first case-insensitive occurrence, else none: the whole sentence is outside)."""
    if span is None:
        span = find_span(mention, sentence)
    if span is None:
        return set(text_tokens(sentence))
    s, e = span
    return set(text_tokens(sentence[:s])) | set(text_tokens(sentence[e:]))


def name_features(
    mention: str,
    sentence: str,
    span: tuple[int, int] | None,
    names: Sequence[Sequence[str]],
) -> np.ndarray:
    """String features of one mention against K candidates: float32 ``(K, len(NAME_FEATURES))``.

    ``names[k]`` is candidate k's name followed by its aliases; each name/alias feature is the
    best (max) over them, ``name_tokens_count`` is that of the primary name. A candidate with no
    name gets zeros (and counts for no ambiguity). ``ambiguity`` and ``ambiguity_share`` are the
    same for every row: how many candidates of this list (of K) hold every mention token.
    """
    K = len(names)
    out = np.zeros((K, len(NAME_FEATURES)), dtype=np.float32)
    if K == 0:
        return out
    m = _analyse(mention)
    outside = _outside_tokens(mention, sentence, span) - m.token_set
    variants: list[_Name] = []
    owner: list[int] = []
    for k, cand in enumerate(names):
        if cand:
            out[k, _COL["name_tokens_count"]] = len(_analyse(cand[0]).tokens)
        for s in cand:
            variants.append(_analyse(s))
            owner.append(k)
    if not variants:
        return out
    mt, ms, mg = m.tokens, m.token_set, m.grams
    n_mt, n_ms, n_mg = len(mt), len(ms), len(m.grams)
    zero = (0.0,) * len(_PER_VARIANT)
    rows: list[tuple[float, ...]] = []
    for n in variants:  # one pass of set operations per name; edit similarities below
        nt, ts = n.tokens, n.token_set
        if not nt:
            rows.append(zero)
            continue
        cos = len(mg & n.grams) / math.sqrt(n_mg * n.n_grams) if n_mg else 0.0
        other = len(ts & outside) / n.n_set
        if ms.isdisjoint(ts):
            # most of a list: no mention token in the name, so no containment, and no equal
            # first / last / leading tokens either
            rows.append((cos, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, other))
            continue
        shared = len(ms & ts)
        k_ = min(n_mt, len(nt))
        rows.append(
            (
                cos,
                shared / n_ms,
                shared / n.n_set,
                float(m.norm == n.norm),
                float(mt[:k_] == nt[:k_]),
                float(mt[-1] == nt[-1]),
                float(mt[0] == nt[0]),
                0.0,
                0.0,
                other,
            )
        )
    per = np.array(rows, dtype=np.float32)
    contains_all = per[:, 1] == 1.0  # every mention token is in this name
    # the edit similarities of all variants at once (C++, one call each)
    choices = [n.norm for n in variants]
    for col, scorer in (("edit_ratio", fuzz.ratio), ("edit_token_set", fuzz.token_set_ratio)):
        per[:, _COL[col]] = (
            process.cdist([m.norm], choices, scorer=scorer, dtype=np.float32)[0] / 100
        )
    # best over each candidate's name + aliases; candidates without a name keep zeros
    own = np.asarray(owner, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
    out[own[starts], : len(_PER_VARIANT)] = np.maximum.reduceat(per, starts, axis=0)
    ambiguous = np.zeros(K, dtype=bool)
    ambiguous[own[contains_all]] = True
    out[:, _COL["ambiguity"]] = ambiguous.sum()
    out[:, _COL["ambiguity_share"]] = ambiguous.sum() / K
    return out


__all__ = [
    "ANALYSED",
    "NAME_FEATURES",
    "analyse_names",
    "char_ngrams",
    "containment",
    "name_features",
    "name_tokens",
    "norm_name",
    "text_tokens",
    "trigram_cosine",
]
