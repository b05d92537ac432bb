"""The lexical channel: name features (models/lexical.py), aliases and popularity in the
canonical format, and the trigram tf-idf index of names + aliases (index/lexical.py)."""

from __future__ import annotations

import json
import random
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from rapidfuzz import fuzz

import index.build as build_mod
import index.lexical as lexical_index_module
from index import cli
from index.build import BuildConfig, add, build
from index.lexical import LEXICAL_DIR, LexicalIndex, build_lexical, gram_keys
from index.search import IndexSearcher
from index.store import MANIFEST_FILE, Manifest
from models.data.schema import Entity, RecordReport, iter_entities, parse_entity, write_jsonl
from models.lexical import (
    NAME_FEATURES,
    NameTable,
    char_ngrams,
    containment,
    name_features,
    name_tokens,
    norm_name,
    sorted_distinct,
    trigram_cosine,
)
from models.model import LinkingModel
from models.preprocess import mention_text

COL = {f: i for i, f in enumerate(NAME_FEATURES)}
REINFELDT = "Reinfeldt with U.S. President George W. Bush"


# ------------------------------------------------------------------------- string features
def test_normalisation_tokens_and_ngrams() -> None:
    assert norm_name("  Beyoncé   Knowles (singer) ") == "beyonce knowles"
    assert norm_name("ÅSA (a) (b)") == "asa (a)"  # only the trailing qualifier goes
    assert name_tokens("George W. Bush (politician)") == ["george", "w", "bush"]
    assert char_ngrams("Ab") == [" ab", "ab "]
    assert char_ngrams("") == ["  "]
    assert char_ngrams("abc", n=2) == [" a", "ab", "bc", "c "]


def _norm_name_as_in_bench(s: str) -> str:
    """bench/wikimel.py's norm_name before it moved (the reference of the fast path)."""
    s = re.sub(r"\s*\([^)]*\)\s*$", "", s)
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c))
    return " ".join(s.casefold().split())


def test_norm_name_equals_the_bench_version() -> None:
    rng = random.Random(2)
    alphabet = "aZ .()-'\tÅéüßİﬁ½ＡǅΣς\u0301x"
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert norm_name(s) == _norm_name_as_in_bench(s), repr(s)


def test_trigram_cosine_and_containment() -> None:
    assert trigram_cosine("Joe Biden", "JOE  BIDEN") == pytest.approx(1.0)
    assert trigram_cosine("abc", "xyz") == 0.0
    assert trigram_cosine("", "") == 0.0 and trigram_cosine("(x)", "x") == 0.0
    # {" ab", "ab "} vs {" ab", "abc", "bc "}: one shared of 2 and 3
    assert trigram_cosine("ab", "abc") == pytest.approx(1 / np.sqrt(6))
    assert containment(["joe", "biden"], ["biden"]) == 0.5
    assert containment(["biden", "biden"], ["joe", "biden"]) == 1.0  # distinct tokens
    assert containment([], ["x"]) == 0.0


def test_namesakes_are_ambiguous() -> None:
    names = [["Joe Biden"], ["Jill Biden"], ["Hunter Boden"], []]
    f = name_features("Biden", "Biden spoke in Delaware.", None, names)
    assert f.shape == (4, len(NAME_FEATURES)) and f.dtype == np.float32
    # both Bidens hold the mention: ambiguity 2 of the 4 candidates, on every row
    assert f[:, COL["ambiguity"]].tolist() == [2, 2, 2, 2]
    assert f[:, COL["ambiguity_share"]].tolist() == [0.5] * 4
    assert f[:, COL["mention_in_name"]].tolist() == [1, 1, 0, 0]
    assert f[:, COL["name_in_mention"]].tolist() == [0.5, 0.5, 0, 0]
    assert f[:, COL["last_token"]].tolist() == [1, 1, 0, 0]
    assert f[:, COL["first_token"]].tolist() == [0, 0, 0, 0]
    assert f[:, COL["exact"]].sum() == 0
    assert f[:, COL["name_tokens_count"]].tolist() == [2, 2, 2, 0]
    assert not f[3, : COL["ambiguity"]].any()  # a candidate without a name: zeros
    assert name_features("Biden", "", None, []).shape == (0, len(NAME_FEATURES))


def test_other_tokens_of_the_name_elsewhere_in_the_sentence() -> None:
    names = [["George Reinholt"], ["Fredrik Reinfeldt"]]
    f = name_features("Reinfeldt", REINFELDT, (0, 9), names)
    # "George" is in the sentence, outside the mention: evidence of another person
    assert f[0, COL["other_in_sentence"]] == 0.5
    assert f[1, COL["other_in_sentence"]] == 0.0
    assert f[1, COL["last_token"]] == 1 and f[1, COL["mention_in_name"]] == 1
    # no span: the mention's first occurrence; a mention not in the sentence: all is outside
    assert np.array_equal(name_features("Reinfeldt", REINFELDT, None, names), f)
    g = name_features("Reinholt", "George met the press.", None, names)
    assert g[0, COL["other_in_sentence"]] == 0.5
    # tokens of the mention itself do not count, wherever they occur
    h = name_features("George", "George met George Bush.", (0, 6), [["George Bush"]])
    assert h[0, COL["other_in_sentence"]] == 0.5


def test_exact_prefix_first_and_last_token() -> None:
    names = [["George W. Bush"], ["George Bush"], ["Bush"], ["Beyoncé (singer)"]]
    f = name_features("George W.", "", None, names)
    assert f[:, COL["prefix"]].tolist() == [1, 0, 0, 0]
    assert f[:, COL["first_token"]].tolist() == [1, 1, 0, 0]
    assert f[:, COL["exact"]].tolist() == [0, 0, 0, 0]
    g = name_features("bush", "", None, names)
    assert g[:, COL["exact"]].tolist() == [0, 0, 1, 0]
    assert g[:, COL["prefix"]].tolist() == [0, 0, 1, 0]  # equal names are prefixes
    assert g[:, COL["last_token"]].tolist() == [1, 1, 1, 0]
    b = name_features("BEYONCE", "", None, names)
    assert b[3, COL["exact"]] == 1 and b[3, COL["edit_ratio"]] == 1
    # "George Bu" is no word-boundary prefix of "George Bush"
    assert name_features("George Bu", "", None, [["George Bush"]])[0, COL["prefix"]] == 0


def test_aliases_take_the_best_value() -> None:
    names = [["William Jefferson Clinton", "Bill Clinton"], ["William Jefferson Clinton"]]
    f = name_features("Bill Clinton", "", None, names)
    assert f[0, COL["exact"]] == 1 and f[1, COL["exact"]] == 0
    assert f[0, COL["edit_ratio"]] == 1 and f[0, COL["trigram_cosine"]] == pytest.approx(1)
    assert f[0, COL["name_tokens_count"]] == 3  # the primary name's
    # each feature is the best over the variants, not the features of one best variant
    g = name_features("Bill", "", None, [["Bill Clinton", "Bill"], ["Billy"]])
    assert g[0, COL["exact"]] == 1 and g[0, COL["name_in_mention"]] == 1
    assert g[0, COL["ambiguity"]] == 1


def test_name_features_equal_the_pairwise_computation() -> None:
    rng = random.Random(0)
    letters = "abcdeéfgh"

    def word() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(1, 6))).title()

    def name() -> str:
        return " ".join(word() for _ in range(rng.randint(1, 3)))

    for _ in range(5):
        mention = name()
        names = [[name() for _ in range(rng.randint(1, 3))] for _ in range(40)]
        f = name_features(mention, f"{name()} and {mention} met {name()}.", None, names)
        m, mt = norm_name(mention), name_tokens(mention)
        for k, variants in enumerate(names):
            want = {
                "trigram_cosine": max(trigram_cosine(mention, v) for v in variants),
                "mention_in_name": max(containment(mt, name_tokens(v)) for v in variants),
                "name_in_mention": max(containment(name_tokens(v), mt) for v in variants),
                "exact": max(float(m == norm_name(v)) for v in variants),
                "edit_ratio": max(fuzz.ratio(m, norm_name(v)) / 100 for v in variants),
                "edit_token_set": max(
                    fuzz.token_set_ratio(m, norm_name(v)) / 100 for v in variants
                ),
                "name_tokens_count": len(name_tokens(variants[0])),
            }
            for feat, value in want.items():
                assert f[k, COL[feat]] == pytest.approx(value, abs=1e-6), (feat, k)
        holds = [any(set(mt) <= set(name_tokens(v)) for v in vs) for vs in names]
        assert (f[:, COL["ambiguity"]] == sum(holds)).all()


def _random_kb(rng: random.Random, rows: int) -> tuple[list[list[str]], list[str]]:
    """Names drawn from a small vocabulary so that lists share tokens, with aliases, repeated
    tokens, qualifiers, accents, names that have no word token and rows without a name."""
    vocab = ["Joe", "Biden", "Jill", "Bush", "George", "W.", "Élan", "elan", "de", "la", "Q"]

    def name() -> str:
        r = rng.random()
        if r < 0.04:
            return "!!!"  # no word token
        if r < 0.06:
            return ""
        words = [rng.choice(vocab) for _ in range(rng.randint(1, 4))]
        tail = " (band)" if rng.random() < 0.1 else ""
        return " ".join(words) + tail

    kb = [[name() for _ in range(rng.choice([1, 1, 1, 2, 3]))] for _ in range(rows)]
    kb[3] = []  # a row with no names at all
    mentions = [name() for _ in range(60)] + ["Zork Biden", "", "Joe Joe", "George W. Bush"]
    return kb, mentions


def test_the_names_table_equals_the_per_name_features() -> None:
    rng = random.Random(1)
    kb, mentions = _random_kb(rng, 300)
    table = NameTable.build(kb)
    single = [names[:1] or ["x"] for names in kb]
    table1 = NameTable.build(single)
    assert len(table) == 300
    for i, mention in enumerate(mentions):
        rows = np.array(rng.sample(range(300), rng.randint(1, 120)))
        if i % 7 == 0:
            rows = np.array([3, 3, 5])  # the nameless row, a repeated row
        words = [rng.choice(["Joe", "Jill", "met", "Bush", "in", "la"]) for _ in range(6)]
        sentence = f"{' '.join(words[:3])} {mention} {' '.join(words[3:])}."
        span = None
        if i % 3 == 0 and mention:
            start = sentence.index(mention)
            span = (start, start + len(mention))
        want = name_features(mention, sentence, span, [kb[r] for r in rows])
        got = table.features(mention, sentence, span, rows)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got, want), (mention, sentence)
        # one name per row (no aliases): the table's short path
        want1 = name_features(mention, sentence, span, [single[r] for r in rows])
        assert np.array_equal(table1.features(mention, sentence, span, rows), want1)


def test_candidate_features_read_the_table_only_for_rows_it_holds() -> None:
    from models.fusion import (
        CandidateInfo,
        CandidateSignals,
        EntityPrior,
        MentionText,
        candidate_features,
    )

    rng = random.Random(2)
    kb, _ = _random_kb(rng, 50)
    table = NameTable.build(kb[:40])  # rows 40.. were added after: not in the table
    nprng = np.random.default_rng(0)
    B, K = 3, 12
    rows = np.array([nprng.choice(40, K, replace=False), np.arange(35, 47), np.arange(K)])
    rows[2, 10:] = -1  # padding
    info = [
        [CandidateInfo(f"Q{r}", tuple(kb[r]), None) if r >= 0 else None for r in line]
        for line in rows.tolist()
    ]
    sig = CandidateSignals(
        rows=rows,
        dense=nprng.normal(size=(B, K)).astype(np.float32),
        from_dense=np.ones((B, K), bool),
        from_lexical=np.zeros((B, K), bool),
        lexical=np.zeros((B, K), np.float32),
        mimic=nprng.normal(size=(B, K, 4)).astype(np.float32),
        drin=None,
        name_cos=nprng.uniform(size=(B, K)).astype(np.float32),
        info=info,
    )
    men = [MentionText("Joe Biden", "Joe Biden met Jill."), MentionText("Bush", "Bush (band)")]
    men.append(MentionText("la Q", "la Q de Élan", (0, 4)))
    prior = EntityPrior.fit([("Biden", "Q1"), ("Joe Biden", "Q2")])
    want = candidate_features(men, sig, prior)
    got = candidate_features(men, sig, prior, table=table)
    assert np.array_equal(got, want, equal_nan=True)


def test_sorted_distinct_is_unique() -> None:
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 63, 64, 65, 3000):
        a = rng.integers(0, 50 if n < 100 else 2000, n)
        assert np.array_equal(sorted_distinct(a), np.unique(a))
        assert sorted_distinct(a).dtype == a.dtype
    keys = gram_keys("Joe Biden")
    with pytest.raises(ValueError):
        keys[0] = 1  # cached: read-only


# ------------------------------------------------------------------------ canonical format
def test_aliases_and_popularity_parse_and_count_bad_values() -> None:
    report = RecordReport()
    good = parse_entity(
        {"id": "Q1", "name": "Joe Biden", "aliases": ["Joseph Biden", "JRB"], "popularity": 7},
        report,
    )
    assert good is not None and good.aliases == ("Joseph Biden", "JRB")
    assert good.popularity == 7.0 and report.total == 0
    for bad, reason in [
        ({"aliases": "Joseph Biden"}, "entity.bad_aliases"),
        ({"aliases": ["ok", 3, " "]}, "entity.bad_aliases"),
        ({"popularity": -1}, "entity.bad_popularity"),
        ({"popularity": "high"}, "entity.bad_popularity"),
        ({"popularity": True}, "entity.bad_popularity"),
        ({"popularity": float("nan")}, "entity.bad_popularity"),
    ]:
        report = RecordReport()
        ent = parse_entity({"id": "Q1", "name": "Joe Biden", **bad}, report)
        assert ent is not None and report.counts == {reason: 1}, bad  # kept, counted
    assert ent.popularity is None
    ent = parse_entity({"id": "Q1", "name": "n", "aliases": ["ok", 3]}, RecordReport())
    assert ent is not None and ent.aliases == ("ok",)
    none = parse_entity({"id": "Q1", "name": "n", "aliases": None, "popularity": None}, report)
    assert none == Entity("Q1", "n")


def test_optional_fields_are_written_only_when_present(tmp_path: Path) -> None:
    plain = Entity("Q2", "Alan Turing", "", ("a.jpg",))
    assert list(plain.to_json()) == ["id", "name", "attributes", "images"]  # as before
    full = Entity("Q1", "Joe Biden", aliases=("Joseph Biden",), popularity=3.5)
    write_jsonl(tmp_path / "kb.jsonl", [plain, full])
    lines = (tmp_path / "kb.jsonl").read_text().splitlines()
    assert lines[0] == '{"id": "Q2", "name": "Alan Turing", "attributes": "", "images": ["a.jpg"]}'
    assert json.loads(lines[1])["aliases"] == ["Joseph Biden"]
    assert list(iter_entities(tmp_path / "kb.jsonl")) == [plain, full]


# --------------------------------------------------------------------------- lexical index
def _dense_reference(
    names: list[list[str]], queries: list[str]
) -> tuple[np.ndarray, list[set[str]], list[int]]:
    """(queries, entities) best cosine over name + aliases, from dense tf-idf matrices."""
    grams, owner = [], []
    for row, variants in enumerate(names):
        seen = set()
        for v in variants:
            if norm_name(v) and norm_name(v) not in seen:
                seen.add(norm_name(v))
                grams.append(set(char_ngrams(v)))
                owner.append(row)
    vocab = {g: i for i, g in enumerate(sorted(set().union(*grams)))}
    x = np.zeros((len(grams), len(vocab)))
    for i, gs in enumerate(grams):
        x[i, [vocab[g] for g in gs]] = 1
    n = len(grams)
    idf = np.log((1 + n) / (1 + x.sum(0))) + 1
    w = x * idf
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    out = np.zeros((len(queries), len(names)))
    for b, q in enumerate(queries):
        qv = np.zeros(len(vocab))
        unknown = 0.0
        for g in set(char_ngrams(q)) if norm_name(q) else ():
            if g in vocab:
                qv[vocab[g]] = idf[vocab[g]]
            else:  # a gram no name has still counts in the query's norm
                unknown += (np.log(1 + n) + 1) ** 2
        s = w @ qv / max(np.sqrt(qv @ qv + unknown), 1e-30)
        np.maximum.at(out[b], np.asarray(owner), s)
    return out, grams, owner


def _entities_folder(root: Path, names: list[list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ents = [Entity(f"Q{i}", ns[0], aliases=tuple(ns[1:])) for i, ns in enumerate(names)]
    write_jsonl(root / "entities.jsonl", ents)
    return root


def _random_names(rng: random.Random, n: int) -> list[list[str]]:
    def word() -> str:
        return "".join(rng.choice("abcdefghijkl") for _ in range(rng.randint(2, 7))).title()

    return [
        [" ".join(word() for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        for _ in range(n)
    ]


def test_gram_keys_are_the_trigram_set() -> None:
    for s in ["Jo", "Joe Biden", "  Ünïcode  (x)", "aaaa", "日本語の名前", "\U0001f600 x"]:
        assert len(gram_keys(s)) == len(set(char_ngrams(s)))
        assert np.all(np.diff(gram_keys(s)) > 0)
    assert len(gram_keys("")) == 0 and len(gram_keys("(only a qualifier)")) == 0
    assert not np.intersect1d(gram_keys("abc"), gram_keys("cba")).size


@pytest.mark.parametrize("accumulate", [0, 10**9], ids=["sorted", "one-slot-per-entry"])
def test_search_equals_the_dense_computation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accumulate: int
) -> None:
    # both ways of summing a query's postings (Postings.top picks by their count)
    monkeypatch.setattr(lexical_index_module, "DENSE_ACCUMULATE", accumulate)
    rng = random.Random(1)
    names = _random_names(rng, 300)
    names[7] = ["Same", "SAME", "same (qualifier)"]  # one entry: aliases normalising alike
    folder = _entities_folder(tmp_path / "idx", names)
    record = build_lexical(folder, len(names))
    queries = [" ".join(rng.choice(names)[0].split()[:1]) + "x" for _ in range(30)]
    queries += [names[3][-1], "zzz", "", "Same"]
    dense, grams, _ = _dense_reference(names, queries)
    assert record["entries"] == len(grams) and record["postings"] == sum(map(len, grams))
    exact = LexicalIndex(folder, skip_df_share=1.0)  # no gram skipped: exact cosines
    k = 10
    rows, scores = exact.search(queries, k)
    assert rows.shape == scores.shape == (len(queries), k)
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    for b in range(len(queries)):
        best = np.sort(dense[b])[::-1][:k]
        got = rows[b] >= 0
        np.testing.assert_allclose(scores[b, got], best[: got.sum()], atol=1e-5)
        np.testing.assert_allclose(scores[b, got], dense[b, rows[b, got]], atol=1e-5)
        assert (best[got.sum() :] == 0).all() and (scores[b, ~got] == 0).all()
        assert (np.diff(scores[b, got]) <= 0).all() and len(set(rows[b, got])) == got.sum()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert rows[-1, 0] == 7 and scores[-1, 0] == pytest.approx(1.0)
    assert (rows[-2] == -1).all() and (rows[-3] == -1).all()  # nothing shares a gram
    # frequent grams skipped for speed: never above the exact cosine, same best entity here
    fast = LexicalIndex(folder, skip_df_share=0.02, skip_df_min=0)
    fr, fs = fast.search(queries, k)
    for b in range(len(queries)):
        got = fr[b] >= 0
        assert (fs[b, got] <= dense[b, fr[b, got]] + 1e-5).all()
    assert fr[-1, 0] == 7
    # batch = 1 and k = 1, the online case, and k larger than the index
    assert exact.search([queries[0]], 1)[0].shape == (1, 1)
    assert (exact.search(["Same"], 1000)[0][0, len(names) :] == -1).all()


@pytest.fixture(scope="module")
def lexical_kb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Politicians and namesakes, plus 30 entities whose *text* is the mention's sentence (what
    the dense channel matches) under short unrelated names (what the lexical one matches)."""
    root = tmp_path_factory.mktemp("lexical-kb")
    rng = random.Random(4)
    ents = [
        Entity(
            "Q1",
            "Fredrik Reinfeldt",
            "Occupation: politician.",
            aliases=("John Fredrik Reinfeldt",),
            popularity=50.0,
        ),
        Entity("Q2", "George Reinholt", "Occupation: actor."),
        Entity("Q3", "Joe Biden", "Occupation: politician.", aliases=("Joseph Robinette Biden",)),
        Entity("Q4", "Jill Biden", "Occupation: educator."),
        Entity("Q5", "George W. Bush", "Occupation: politician."),
    ]
    for i in range(30):
        name = " ".join(
            "".join(rng.choice("abcghkmopsuvwxyz") for _ in range(3)).title() for _ in range(2)
        )
        ents.append(Entity(f"D{i}", name, DENSE_SENTENCE))
    write_jsonl(root / "kb.jsonl", ents)
    return root / "kb.jsonl"


DENSE_SENTENCE = "Reinfeld met Bush in Stockholm."


@pytest.fixture(scope="module")
def lexical_index(
    lexical_kb: Path, artifacts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("lexical-index") / "idx"
    build(_config(lexical_kb, artifacts[0], out))
    return out


def _config(kb: Path, model_dir: Path, out: Path) -> BuildConfig:
    return BuildConfig(
        kb=str(kb),
        model=str(model_dir),
        out=str(out),
        chunk_size=8,
        batch_size=8,
        workers=1,
        progress=False,
        device="cpu",
        drin_fields=False,
    )


def _searcher(folder: Path, model_dir: Path) -> IndexSearcher:
    return IndexSearcher(folder, LinkingModel.from_pretrained(model_dir).fingerprint())


def test_tiny_world_index_has_the_channel(artifacts: tuple[Path, Path]) -> None:
    model_dir, index_dir = artifacts
    s = _searcher(index_dir, model_dir)
    assert s.has_lexical and s.manifest.lexical["entries"] == 16
    hits = s.lexical(["Jo Bel", "jo  DUNN"], k=4)  # misspelt; case and spaces normalised
    assert hits.rows.shape == hits.scores.shape == (2, 4)
    assert sorted(s.entity(int(r))["id"] for r in hits.rows[0]) == ["E10", "E11", "E12", "E13"]
    assert sorted(s.entity(int(r))["id"] for r in hits.rows[1]) == ["E30", "E31", "E32", "E33"]
    assert (hits.scores[0] < 1).all() and hits.scores[1] == pytest.approx(1.0)
    s.close()


def test_misspellings_and_aliases_are_found(
    lexical_index: Path, artifacts: tuple[Path, Path]
) -> None:
    s = _searcher(lexical_index, artifacts[0])
    assert s.manifest.lexical["entries"] == 35 + 2  # two aliases
    ids = [
        [s.entity(int(r))["id"] if r >= 0 else None for r in row]
        for row in s.lexical(["Fredrick Reinfelt", "Robinette", "Biden", "qqqq"], k=2).rows
    ]
    assert ids[0][0] == "Q1"  # misspelt twice
    assert ids[1] == ["Q3", None]  # only Joe Biden's alias has it
    assert sorted(ids[2]) == ["Q3", "Q4"]  # the namesakes
    assert ids[3] == [None, None]
    assert s.entity(s.store.row_of("Q1"))["aliases"] == ["John Fredrik Reinfeldt"]
    s.close()


def test_lexical_finds_what_dense_misses(lexical_index: Path, artifacts: tuple[Path, Path]) -> None:
    """The mention "Reinfeld" (sic): its dense query matches the 30 entities whose text is its
    sentence, the lexical channel matches Fredrik Reinfeldt's name."""
    model = LinkingModel.from_pretrained(artifacts[0])
    s = IndexSearcher(lexical_index, model.fingerprint())
    target = s.store.row_of("Q1")
    with torch.inference_mode():
        feats = model.encoder.encode([mention_text("Reinfeld", DENSE_SENTENCE)], [None])
        dense = s.search(model.matcher.retrieval_queries(feats).numpy(), k=2)
    lexical = s.lexical(["Reinfeld"], k=2)
    assert target not in dense.rows[0].tolist()
    assert lexical.rows[0, 0] == target and lexical.scores[0, 0] > 0.5
    s.close()


def test_add_makes_new_entities_searchable(
    lexical_index: Path, artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "idx"
    shutil.copytree(lexical_index, folder)
    before = _searcher(folder, artifacts[0])
    old = before.lexical(["Biden"], k=2)
    before.close()
    write_jsonl(
        tmp_path / "new.jsonl",
        [Entity("Q9", "Zbigniew Brzezinski", "Occupation: diplomat.", aliases=("Zbig",))],
    )
    model = LinkingModel.from_pretrained(artifacts[0])
    m = add(folder, str(tmp_path / "new.jsonl"), model, device="cpu", progress=False, workers=1)
    assert m.lexical["entries"] == 37 + 2 and Manifest.load(folder).lexical == m.lexical
    s = IndexSearcher(folder, model.fingerprint())
    hits = s.lexical(["Brzezinsky", "zbig", "Biden"], k=2)
    assert hits.rows[0, 0] == hits.rows[1, 0] == s.store.row_of("Q9") == 35
    assert np.array_equal(hits.rows[2], old.rows[0])  # old rows are untouched
    assert not (folder / f"{LEXICAL_DIR}.tmp").exists()
    assert not (folder / f"{LEXICAL_DIR}.old").exists()
    s.close()


def test_old_folder_opens_and_cli_adds_the_channel(
    lexical_index: Path,
    lexical_kb: Path,
    artifacts: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "old"
    shutil.copytree(lexical_index, folder)
    # a folder built before this channel: no lexical/, no "lexical" in its manifest
    shutil.rmtree(folder / LEXICAL_DIR)
    doc = json.loads((folder / MANIFEST_FILE).read_text())
    del doc["lexical"]
    (folder / MANIFEST_FILE).write_text(json.dumps(doc))
    assert Manifest.load(folder).lexical == {}
    s = _searcher(folder, artifacts[0])
    assert not s.has_lexical
    with pytest.raises(ValueError, match="mel-index lexical"):
        s.lexical(["Biden"], k=1)
    assert s.search(np.zeros((1, s.index.d), np.float32), k=3).rows.shape == (1, 3)
    s.close()
    assert cli.main(["lexical", "--index", str(folder)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lexical"] == Manifest.load(lexical_index).lexical
    for p in sorted((lexical_index / LEXICAL_DIR).iterdir()):
        assert (folder / LEXICAL_DIR / p.name).read_bytes() == p.read_bytes(), p.name
    s = _searcher(folder, artifacts[0])
    assert s.has_lexical and s.lexical(["Robinette"], k=1).rows[0, 0] == s.store.row_of("Q3")
    s.close()
    # `mel-index build` over such a finished folder reuses it and adds the channel
    again = tmp_path / "again"
    shutil.copytree(lexical_index, again)
    shutil.rmtree(again / LEXICAL_DIR)
    doc = json.loads((again / MANIFEST_FILE).read_text())
    doc["lexical"] = {}
    (again / MANIFEST_FILE).write_text(json.dumps(doc))
    monkeypatch.setattr(build_mod, "encode_shard", lambda *a, **k: pytest.fail("re-encoded"))
    m = build(_config(lexical_kb, artifacts[0], again))
    assert isinstance(m, Manifest) and m.lexical == Manifest.load(lexical_index).lexical
    assert Manifest.load(again).lexical == m.lexical
    # a lexical index that does not cover the store (an interrupted add) is refused
    build_lexical(folder, Manifest.load(folder).entity_count - 1)
    with pytest.raises(ValueError, match="interrupted add"):
        _searcher(folder, artifacts[0])
