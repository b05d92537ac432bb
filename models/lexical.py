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


# ------------------------------------------------------------------------ trigram keys
_BITS = 21  # a Unicode code point fits in 21 bits; three of them in a non-negative int64


def padded_code_points(norms: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Code points of ``" n "`` for each normalised name, concatenated, and each one's start."""
    text = "".join(f" {n} " for n in norms)
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
    lengths = np.fromiter((len(n) + 2 for n in norms), dtype=np.int64, count=len(norms))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(norms) else lengths
    return cp, starts


def pack_trigrams(cp: np.ndarray) -> np.ndarray:
    """The int64 key of every window of three code points (exact: 21 bits each)."""
    return (cp[:-2] << (2 * _BITS)) | (cp[1:-1] << _BITS) | cp[2:]


def sorted_distinct(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` by a sort and a mask: numpy 2.4's unique hashes first, 3-7x slower on
    the few hundred to few thousand integers a query gathers."""
    if len(a) < 64:  # a name's trigrams: Python's set and sort beat numpy's call overhead
        return np.array(sorted(set(a.tolist())), dtype=a.dtype)
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def gram_keys(name: str) -> np.ndarray:
    """Sorted distinct int64 keys of a name's character trigrams: one key per element of
    ``set(char_ngrams(name))`` (none for a name that normalises to nothing). Read-only: the
    keys of recent names are cached."""
    return _norm_gram_keys(norm_name(name))


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


# --------------------------------------------------------------------- the table form
def _ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated ranges ``[starts[i], starts[i] + counts[i])`` and, for each element,
    the ``i`` it came from."""
    owner = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    return np.repeat(starts - first, counts) + np.arange(int(counts.sum())), owner


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of ``keys`` are in ``sorted_keys`` (bool)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


@dataclass(frozen=True, eq=False)
class NameTable:
    """Every name and alias of a KB analysed once into flat arrays, so that
    :meth:`features` computes :func:`name_features` for a list of KB rows with a few numpy
    operations instead of set operations per name: the same values (``tests/test_lexical.py``
    checks them equal), in a third of the time on a 120-candidate list, most of it because
    contiguous arrays stay cheap when the request's earlier stages (a flat search streaming
    the whole vector table) have pushed the analysed names out of the CPU caches.

    Tokens and normalised names are numbered in a vocabulary of the KB's own; a mention
    token the KB never uses gets -1 and so matches no name token, exactly as the string
    comparison would. Memory: ~100 bytes per name plus 8 per distinct trigram of each name;
    the server builds one for a KB it preloads (``service.rerankers.CandidateInfoReader``).
    """

    row_ptr: np.ndarray  # (R + 1,): row r's names and aliases are variants [row_ptr[r], [r + 1])
    norm_strings: np.ndarray  # (V,) object: normalised variant names (edit similarities)
    norm_id: np.ndarray  # (V,) vocabulary id of the normalised name
    gram_ptr: np.ndarray  # (V + 1,) CSR over gram_keys
    gram_keys: np.ndarray  # sorted distinct trigram keys of each variant
    seq_ptr: np.ndarray  # (V + 1,) CSR over seq_ids
    seq_ids: np.ndarray  # token ids of each variant in order (repeats kept)
    set_ptr: np.ndarray  # (V + 1,) CSR over set_ids
    set_ids: np.ndarray  # distinct token ids of each variant
    n_grams: np.ndarray  # (V,)
    primary_tokens: np.ndarray  # (R,) tokens of each row's primary name (0 without names)
    tokens: dict[str, int]  # token -> id
    names: dict[str, int]  # normalised name -> id

    @classmethod
    def build(cls, rows: Sequence[Sequence[str]]) -> NameTable:
        """``rows[r]``: row r's name followed by its aliases (as :func:`name_features` takes
        them)."""
        tokens: dict[str, int] = {}
        names: dict[str, int] = {}
        norms: list[str] = []
        row_counts, primary = [], []
        seq_parts: list[list[int]] = []
        grams: list[np.ndarray] = []
        for cand in rows:
            row_counts.append(len(cand))
            primary.append(len(_analyse(cand[0]).tokens) if cand else 0)
            for s in cand:
                n = _analyse(s)
                norms.append(n.norm)
                seq_parts.append([tokens.setdefault(t, len(tokens)) for t in n.tokens])
                grams.append(_norm_gram_keys(n.norm))
        norm_id = np.array([names.setdefault(n, len(names)) for n in norms], dtype=np.int64)
        seq_len = np.array([len(q) for q in seq_parts], dtype=np.int64)
        sets = [sorted(set(q)) for q in seq_parts]
        set_len = np.array([len(q) for q in sets], dtype=np.int64)
        g_len = np.array([len(g) for g in grams], dtype=np.int64)

        def ptr(lengths: np.ndarray) -> np.ndarray:
            return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def flat(parts: Sequence[Sequence[int]]) -> np.ndarray:
            return np.fromiter((i for p in parts for i in p), dtype=np.int64)

        return cls(
            row_ptr=ptr(np.array(row_counts, dtype=np.int64)),
            norm_strings=np.array(norms, dtype=object),
            norm_id=norm_id,
            gram_ptr=ptr(g_len),
            gram_keys=np.concatenate(grams) if grams else np.zeros(0, dtype=np.int64),
            seq_ptr=ptr(seq_len),
            seq_ids=flat(seq_parts),
            set_ptr=ptr(set_len),
            set_ids=flat(sets),
            n_grams=g_len,
            primary_tokens=np.array(primary, dtype=np.float32),
            tokens=tokens,
            names=names,
        )

    def __len__(self) -> int:
        """Rows."""
        return len(self.row_ptr) - 1

    def features(
        self, mention: str, sentence: str, span: tuple[int, int] | None, rows: np.ndarray
    ) -> np.ndarray:
        """:func:`name_features` of one mention against the names of KB ``rows`` (K,),
        every one of them in ``0 .. len(self) - 1``."""
        rows = np.asarray(rows, dtype=np.int64)
        K = len(rows)
        out = np.zeros((K, len(NAME_FEATURES)), dtype=np.float32)
        if K == 0:
            return out
        out[:, _COL["name_tokens_count"]] = self.primary_tokens[rows]
        m = _analyse(mention)
        outside = _outside_tokens(mention, sentence, span) - m.token_set
        starts = self.row_ptr[rows]
        counts = self.row_ptr[rows + 1] - starts
        if (counts == 1).all():  # no aliases: one variant per row
            v, owner = starts, np.arange(K)
        else:
            v, owner = _ranges(starts, counts)
        if not len(v):
            return out
        get = self.tokens.get
        m_seq = np.array([get(t, -1) for t in m.tokens], dtype=np.int64)
        m_set = np.array(sorted({i for i in m_seq.tolist() if i >= 0}), dtype=np.int64)
        out_set = np.array(sorted({get(t, -1) for t in outside} - {-1}), dtype=np.int64)
        n_mt, n_ms, n_mg = len(m.tokens), m.n_set, m.n_grams
        V = len(v)
        # distinct tokens of each variant: how many are the mention's, how many elsewhere
        g0 = self.set_ptr[v]
        n_set = self.set_ptr[v + 1] - g0
        pos, which = _ranges(g0, n_set)
        ids = self.set_ids[pos]
        shared = np.bincount(which, weights=_lookup(m_set, ids), minlength=V)
        elsewhere = np.bincount(which, weights=_lookup(out_set, ids), minlength=V)
        has = n_set > 0  # a variant without tokens scores 0 on every per-name feature
        safe_set = np.maximum(n_set, 1)
        per = np.zeros((V, len(_PER_VARIANT)), dtype=np.float64)
        if n_mg:
            g0 = self.gram_ptr[v]
            pos, which = _ranges(g0, self.n_grams[v])
            common = np.bincount(
                which, weights=_lookup(_norm_gram_keys(m.norm), self.gram_keys[pos]), minlength=V
            )
            per[:, 0] = np.where(has, common / np.sqrt(n_mg * np.maximum(self.n_grams[v], 1)), 0)
        per[:, _COL["other_in_sentence"]] = np.where(has, elsewhere / safe_set, 0.0)
        hit = has & (shared > 0)  # the mention shares a token with this name
        if n_ms and hit.any():
            per[:, 1] = np.where(hit, shared / n_ms, 0.0)
            per[:, 2] = np.where(hit, shared / safe_set, 0.0)
            mid = self.names.get(m.norm, -1)
            per[:, 3] = hit & (self.norm_id[v] == mid)
            s0 = self.seq_ptr[v]
            n_seq = self.seq_ptr[v + 1] - s0
            # leading tokens: the first min(mention, name) tokens equal, in order
            k_ = np.where(hit, np.minimum(n_seq, n_mt), 0)
            pos, which = _ranges(s0, k_)
            step = pos - np.repeat(s0, k_)
            differ = np.bincount(which, weights=self.seq_ids[pos] != m_seq[step], minlength=V)
            per[:, 4] = hit & (differ == 0)
            last = self.seq_ids[np.maximum(s0 + n_seq - 1, 0)]
            per[:, 5] = hit & (last == m_seq[-1])
            per[:, 6] = hit & (self.seq_ids[np.minimum(s0, len(self.seq_ids) - 1)] == m_seq[0])
        per32 = per.astype(np.float32)
        choices = self.norm_strings[v].tolist()
        for col, scorer in (("edit_ratio", fuzz.ratio), ("edit_token_set", fuzz.token_set_ratio)):
            per32[:, _COL[col]] = (
                process.cdist([m.norm], choices, scorer=scorer, dtype=np.float32)[0] / 100
            )
        firsts = (np.cumsum(counts) - counts)[counts > 0]  # each candidate's first variant
        out[owner[firsts], : len(_PER_VARIANT)] = np.maximum.reduceat(per32, firsts, axis=0)
        contains_all = hit & (shared == n_ms) if n_ms else np.zeros(V, dtype=bool)
        ambiguous = np.zeros(K, dtype=bool)
        ambiguous[owner[contains_all]] = True
        out[:, _COL["ambiguity"]] = ambiguous.sum()
        out[:, _COL["ambiguity_share"]] = ambiguous.sum() / K
        return out


@lru_cache(maxsize=ANALYSED)
def _norm_gram_keys(norm: str) -> np.ndarray:
    """:func:`gram_keys` of an already normalised name (cached, so read-only)."""
    if not norm:
        keys = np.zeros(0, dtype=np.int64)
    else:
        cp = np.frombuffer(f" {norm} ".encode("utf-32-le", "surrogatepass"), dtype="<u4")
        keys = sorted_distinct(pack_trigrams(cp.astype(np.int64)))
    keys.flags.writeable = False
    return keys


__all__ = [
    "ANALYSED",
    "NAME_FEATURES",
    "NameTable",
    "analyse_names",
    "char_ngrams",
    "containment",
    "gram_keys",
    "name_features",
    "name_tokens",
    "norm_name",
    "pack_trigrams",
    "padded_code_points",
    "sorted_distinct",
    "text_tokens",
    "trigram_cosine",
]
