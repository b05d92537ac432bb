"""The demo world: deterministic, loadable, and built so that each modality is needed.

The checks re-derive the properties from the written files (kb.jsonl, mentions.jsonl, the
images) rather than trusting the generator's own summary, except where a ground-truth sidecar
is the only record (looks, which member a misleading image shows).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.data import demo_world
from models.data.demo_world import DemoWorldConfig, generate_demo_world
from models.data.schema import load_dataset

N = 240
CONFIG = DemoWorldConfig(num_entities=N, seed=7, workers=1)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("demo") / "world"
    return out, generate_demo_world(out, CONFIG)


@pytest.fixture(scope="module")
def files(world: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    root, _ = world
    kb = _jsonl(root / "kb.jsonl")
    mentions = _jsonl(root / "mentions.jsonl")
    by_surface: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(kb):
        by_surface[e["name"].lower()].append(i)
        by_surface[e["name"].split()[-1].lower()].append(i)
    return {
        "kb": kb,
        "row": {e["id"]: i for i, e in enumerate(kb)},
        "mentions": mentions,
        "by_surface": by_surface,
        "truth_e": {t["id"]: t for t in _jsonl(root / "truth_entities.jsonl")},
        "truth_m": {t["id"]: t for t in _jsonl(root / "truth_mentions.jsonl")},
    }


def _fields(attributes: str) -> dict[str, str]:
    """'Occupation: painter. City: Lisbon. Born: 1872.' -> {'occupation': 'painter', ...}"""
    out = {}
    for part in attributes.rstrip(".").split(". "):
        key, _, value = part.partition(": ")
        out[key.lower()] = value
    return out


def _consistent(files: dict[str, Any], m: dict[str, Any]) -> list[int]:
    """Candidates of the surface string that agree with every attribute word in the sentence."""
    words = set(re.findall(r"\w+", m["sentence"]))
    cands = files["by_surface"][m["mention"].lower()]
    vocab: dict[str, set[str]] = defaultdict(set)
    for i in cands:
        for k, v in _fields(files["kb"][i]["attributes"]).items():
            vocab[k].add(v)
    said = {k: vs & words for k, vs in vocab.items()}
    return [
        i
        for i in cands
        if all(not s or _fields(files["kb"][i]["attributes"])[k] in s for k, s in said.items())
    ]


def _colour_hist(path: Path) -> np.ndarray:
    """A pose-free look descriptor: normalised 4x4x4 RGB histogram of a 32x32 thumbnail."""
    arr = np.asarray(Image.open(path).convert("RGB").resize((32, 32)), dtype=np.int64) // 64
    h = np.bincount((arr[..., 0] * 16 + arr[..., 1] * 4 + arr[..., 2]).ravel(), minlength=64)
    return h / np.linalg.norm(h)


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_whatever_the_workers(
    world: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = world
    again = tmp_path / "again"
    generate_demo_world(again, replace(CONFIG, workers=2))  # > 512 images: the process pool
    first, second = _tree_hashes(root), _tree_hashes(again)
    assert len(first) > 600
    assert first == second


def test_different_seed_different_world(world: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = world
    other = tmp_path / "other"
    generate_demo_world(other, replace(CONFIG, seed=8))
    a, b = _tree_hashes(root), _tree_hashes(other)
    for name in ("kb.jsonl", "mentions.jsonl", "splits.json"):
        assert a[name] != b[name]
    shared_images = set(a) & set(b)
    assert sum(a[k] == b[k] for k in shared_images if k.startswith("images/")) == 0


# ------------------------------------------------------------------------------ the format


def test_loads_cleanly_and_summary_matches_files(world: tuple[Path, dict[str, Any]]) -> None:
    root, summary = world
    ds = load_dataset(root)
    assert ds.report.total == 0, ds.report.to_json()
    counts = ds.summary()
    assert counts["entities"] == N == summary["entities"]
    assert counts["mentions"] == N * CONFIG.mentions_per_entity == summary["mentions"]
    assert counts["entities_with_image"] == summary["entities_with_image"]
    assert counts["mentions_with_image"] == summary["mention_kinds"]["with_image"]
    assert counts["nil_mentions"] == 0
    meta = json.loads((root / "meta.json").read_text())
    assert meta["format"] == "mel-canonical"
    assert meta["mention_kinds"] == summary["mention_kinds"]
    assert meta["config"]["num_entities"] == N
    assert not list(root.parent.glob(".*partial*"))


def test_ids_spans_and_lengths(files: dict[str, Any]) -> None:
    assert all(re.fullmatch(r"E\d{6}", e["id"]) for e in files["kb"])
    assert all(re.fullmatch(r"M\d{7}", m["id"]) for m in files["mentions"])
    for m in files["mentions"]:
        s, e = m["span"]
        assert m["sentence"][s:e] == m["mention"], m
        assert len(m["sentence"].split()) <= 25
        assert m["entity_id"] in files["row"]
    for e in files["kb"]:
        assert len(e["attributes"].split()) <= 25
        assert e["attributes"].startswith("Occupation: ")


def test_splits_70_10_20_disjoint_and_complete(world: tuple[Path, dict[str, Any]]) -> None:
    root, _ = world
    splits = json.loads((root / "splits.json").read_text())
    ids = [json.loads(line)["id"] for line in (root / "mentions.jsonl").open()]
    parts = [set(splits[k]) for k in ("train", "dev", "test")]
    assert sum(len(p) for p in parts) == len(ids)
    assert set().union(*parts) == set(ids)
    for got, want in zip(parts, CONFIG.split_fractions, strict=True):
        assert abs(len(got) / len(ids) - want) < 0.01


# ------------------------------------------------------------------------------ the KB


def test_a_third_of_entities_have_no_image(world: tuple[Path, dict[str, Any]]) -> None:
    root, _ = world
    kb = _jsonl(root / "kb.jsonl")
    without = sum(1 for e in kb if not e["images"])
    assert abs(without / len(kb) - 1 / 3) < 0.02
    with_img = [e for e in kb if e["images"]]
    assert all((root / e["images"][0]).is_file() for e in with_img)
    im = Image.open(root / with_img[0]["images"][0])
    assert im.format == "JPEG" and im.size == (CONFIG.image_size, CONFIG.image_size)


def test_name_groups_of_2_to_5_differ_in_attributes_and_look(files: dict[str, Any]) -> None:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in files["kb"]:
        groups[e["name"]].append(e)
    collided = [g for g in groups.values() if len(g) > 1]
    assert len(collided) >= N // 10
    assert max(len(g) for g in groups.values()) <= 5
    for g in collided:
        fields = [_fields(e["attributes"]) for e in g]
        assert len({(f["occupation"], f["city"]) for f in fields}) == len(g)
        truths = [files["truth_e"][e["id"]] for e in g]
        assert len({t["shape"] for t in truths}) == len(g)
        assert len({t["colour"] for t in truths}) == len(g)
    # Surnames are shared across name groups, so surname-only mentions collide further.
    surnames = Counter(e["name"].split()[-1] for e in files["kb"])
    assert len(surnames) < len(groups)


# ------------------------------------------------------------------------------ mentions


def test_ambiguous_and_partial_name_mentions(files: dict[str, Any]) -> None:
    ms = files["mentions"]
    ambiguous = [m for m in ms if len(files["by_surface"][m["mention"].lower()]) > 1]
    assert len(ambiguous) / len(ms) >= 0.3
    names = {e["name"] for e in files["kb"]}
    partial = [m for m in ms if m["mention"] not in names]
    assert len(partial) / len(ms) >= 0.08
    kb_name = {e["id"]: e["name"] for e in files["kb"]}
    assert all(kb_name[m["entity_id"]].endswith(" " + m["mention"]) for m in partial)


def test_sentences_carry_gold_attribute_words(files: dict[str, Any]) -> None:
    for m in files["mentions"]:
        gold = _fields(files["kb"][files["row"][m["entity_id"]]]["attributes"])
        words = set(re.findall(r"\w+", m["sentence"]))
        assert words & set(gold.values()), m


def test_text_settles_mentions_without_a_trustworthy_image(files: dict[str, Any]) -> None:
    """No image, a misleading image, or a gold without KB image: the words must suffice."""
    settled = total = 0
    for m in files["mentions"]:
        gold_row = files["row"][m["entity_id"]]
        image_kind = files["truth_m"][m["id"]]["image_kind"]
        if m["image"] is None or image_kind == "misleading" or not files["kb"][gold_row]["images"]:
            total += 1
            settled += _consistent(files, m) == [gold_row]
    assert total > 0.3 * len(files["mentions"])
    assert settled / total >= 0.98


def test_text_alone_often_only_narrows_an_ambiguous_name(files: dict[str, Any]) -> None:
    """Where a true image of an imaged gold is given, the words often leave >= 2 candidates:
    this is what a text-only model cannot solve."""
    narrowed = eligible = 0
    for m in files["mentions"]:
        gold_row = files["row"][m["entity_id"]]
        truth = files["truth_m"][m["id"]]
        ambiguous = len(files["by_surface"][m["mention"].lower()]) > 1
        if (
            m["image"]
            and truth["image_kind"] == "true"
            and files["kb"][gold_row]["images"]
            and ambiguous
        ):
            eligible += 1
            cons = _consistent(files, m)
            assert gold_row in cons
            narrowed += len(cons) > 1
    assert eligible > 0
    assert narrowed / len(files["mentions"]) >= 0.12


def test_image_share_kinds_and_unresolvable_share(world: tuple[Path, dict[str, Any]]) -> None:
    _, summary = world
    kinds = summary["mention_kinds"]
    n = summary["mentions"]
    assert 0.1 <= kinds["without_image"] / n <= 0.3
    assert kinds["misleading_image"] > 0
    assert kinds["with_image"] + kinds["without_image"] == n
    assert summary["evidence"]["unresolvable"] <= 0.02 * n
    assert summary["evidence"]["image_resolves"] >= 0.1 * n
    assert sum(summary["evidence"].values()) == n
    oracle = summary["oracle_hits1"]
    assert oracle["text_and_image"] >= 0.98
    assert oracle["text_only"] <= oracle["text_and_image"] - 0.1
    assert oracle["image_only"] <= oracle["text_and_image"] - 0.3


def test_mention_images_are_fresh_views_of_the_right_look(
    world: tuple[Path, dict[str, Any]], files: dict[str, Any]
) -> None:
    """Mention images are never copies of KB images, yet a crude colour histogram already
    matches a true view to its gold within the name group (and a misleading one to the member
    it shows)."""
    root, _ = world
    kb_bytes = {
        hashlib.sha256((root / e["images"][0]).read_bytes()).digest()
        for e in files["kb"]
        if e["images"]
    }
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(files["kb"]):
        if e["images"]:
            groups[e["name"]].append(i)
    hist: dict[int, np.ndarray] = {}
    hits = {"true": [0, 0], "misleading": [0, 0]}
    for m in files["mentions"]:
        if m["image"] is None:
            continue
        assert hashlib.sha256((root / m["image"]).read_bytes()).digest() not in kb_bytes
        gold_row = files["row"][m["entity_id"]]
        members = groups[files["kb"][gold_row]["name"]]
        kind = files["truth_m"][m["id"]]["image_kind"]
        target = (
            gold_row
            if kind == "true"
            else files["row"].get(files["truth_m"][m["id"]]["image_shows"], -1)
        )
        if len(members) < 2 or target not in members:
            continue
        for i in members:
            if i not in hist:
                hist[i] = _colour_hist(root / files["kb"][i]["images"][0])
        view = _colour_hist(root / m["image"])
        best = max(members, key=lambda i: float(view @ hist[i]))
        hits[kind][0] += best == target
        hits[kind][1] += 1
    assert hits["true"][1] >= 50 and hits["misleading"][1] >= 3
    assert hits["true"][0] / hits["true"][1] >= 0.75  # chance: ~0.4
    assert hits["misleading"][0] / hits["misleading"][1] >= 0.6


# ------------------------------------------------------------------------------ robustness


def test_killed_run_leaves_no_finished_looking_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "w"
    small = DemoWorldConfig(num_entities=30, seed=1, workers=1)
    generate_demo_world(out, small)
    before = _tree_hashes(out)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(demo_world, "_render_all", boom)
    with pytest.raises(RuntimeError, match="killed"):
        generate_demo_world(out, replace(small, seed=2))
    assert _tree_hashes(out) == before  # the previous world is untouched
    partial = tmp_path / ".w.partial"
    assert partial.is_dir() and not (partial / "meta.json").exists()
    monkeypatch.undo()
    generate_demo_world(out, replace(small, seed=2))  # a rerun cleans up and replaces
    assert not partial.exists()
    assert _tree_hashes(out) != before


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_demo_world(tmp_path, DemoWorldConfig(num_entities=10, workers=1))
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_nil_mentions_when_asked(tmp_path: Path) -> None:
    summary = generate_demo_world(
        tmp_path / "nil", DemoWorldConfig(num_entities=40, seed=3, nil_share=0.2, workers=1)
    )
    ds = load_dataset(tmp_path / "nil")
    assert ds.report.total == 0
    nil = [m for m in ds.mentions.values() if m.entity_id is None]
    assert len(nil) == summary["mention_kinds"]["nil"] == round(120 * 0.2 / 0.8)
    kb_words = {w.lower() for e in ds.entities for w in e.name.split()}
    assert all(m.mention.split()[-1].lower() not in kb_words for m in nil)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_entities": 0},
        {"image_share": 1.5},
        {"split_fractions": (0.7, 0.2, 0.2)},
        {"no_image_share": 0.7, "misleading_image_share": 0.5},
        {"image_size": 8},
    ],
)
def test_config_is_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DemoWorldConfig(**bad)


def test_image_blind_ceiling_guesses_among_what_the_words_leave_open(
    world: tuple[Path, dict[str, Any]], files: dict[str, Any]
) -> None:
    """The ceiling of a reranker blind to each candidate's own image (DRIN's, see
    tests/test_drin.py) agrees with the words-only derivation from the written files."""
    root, _ = world
    kb_ids = [e["id"] for e in files["kb"]]
    ceiling = demo_world.image_blind_top1(root, {m["id"]: kb_ids for m in files["mentions"]})
    assert set(ceiling) == {m["id"] for m in files["mentions"]}
    for m in files["mentions"]:
        assert ceiling[m["id"]] == pytest.approx(1 / len(_consistent(files, m))), m
    by_kind: dict[str, list[float]] = defaultdict(list)
    for mid, v in ceiling.items():
        by_kind[files["truth_m"][mid]["kind"]].append(v)
    assert min(by_kind["text_resolves"] + by_kind["unambiguous"]) == 1.0
    assert max(by_kind["image_resolves"]) <= 0.5
    # A list without the gold scores 0; a list of the gold alone scores 1.
    m = next(m for m in files["mentions"] if files["truth_m"][m["id"]]["kind"] == "image_resolves")
    others = [e for e in kb_ids if e != m["entity_id"]]
    assert demo_world.image_blind_top1(root, {m["id"]: others}) == {m["id"]: 0.0}
    assert demo_world.image_blind_top1(root, {m["id"]: [m["entity_id"]]}) == {m["id"]: 1.0}
