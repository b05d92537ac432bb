"""The canonical format: round trip, streaming, and bad-record accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.data.schema import (
    Entity,
    Mention,
    RecordReport,
    find_span,
    iter_entities,
    load_dataset,
    write_json,
    write_jsonl,
    write_meta,
)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_round_trip(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x")
    ents = [
        Entity("Q1", "Ada Lovelace", "Occupation: mathematician.", ("images/a.jpg",)),
        Entity("Q2", "Alan Turing", ""),
    ]
    ments = [
        Mention("m1", "Ada", "Ada wrote notes.", (0, 3), "images/a.jpg", "Q1"),
        Mention("m2", "Turing", "Turing ran.", None, None, None),
    ]
    write_jsonl(tmp_path / "kb.jsonl", ents)
    write_jsonl(tmp_path / "mentions.jsonl", ments)
    write_json(tmp_path / "splits.json", {"train": ["m1"], "dev": [], "test": ["m2"]})
    write_meta(tmp_path, name="t", source="unit test")
    ds = load_dataset(tmp_path)
    assert ds.entities == ents
    assert ds.split("train") == [ments[0]]
    assert ds.split("test") == [ments[1]]
    assert ds.entity_row == {"Q1": 0, "Q2": 1}
    assert ds.report.total == 0
    assert ds.summary()["nil_mentions"] == 1
    assert ds.resolve("images/a.jpg") == tmp_path / "images" / "a.jpg"


def test_bad_records_are_counted_not_dropped_silently(tmp_path: Path) -> None:
    _write_lines(
        tmp_path / "kb.jsonl",
        [
            json.dumps({"id": "Q1", "name": "Good", "attributes": "a", "images": ["nope.jpg"]}),
            json.dumps({"id": "Q2", "name": ""}),  # empty name
            json.dumps({"name": "no id"}),  # missing id
            "{not json",  # broken line
            json.dumps({"id": "Q1", "name": "Dup"}),  # duplicate id
            json.dumps(["not", "an", "object"]),
            json.dumps({"id": 7, "name": "Int id"}),  # ints are accepted as ids
        ],
    )
    _write_lines(
        tmp_path / "mentions.jsonl",
        [
            json.dumps(
                {
                    "id": "m1",
                    "mention": "Good",
                    "sentence": "Good day",
                    "span": [0, 4],
                    "image": None,
                    "entity_id": "Q1",
                }
            ),
            json.dumps({"id": "m2", "mention": "X", "sentence": "X", "entity_id": "Q404"}),
            json.dumps(
                {
                    "id": "m3",
                    "mention": "Good",
                    "sentence": "Good",
                    "span": [2, 99],
                    "entity_id": "Q1",
                }
            ),  # span outside the sentence
            json.dumps({"id": "m4", "sentence": "no surface", "entity_id": "Q1"}),
            json.dumps(
                {
                    "id": "m5",
                    "mention": "Good",
                    "sentence": "Good",
                    "entity_id": "Q1",
                    "image": "missing.jpg",
                }
            ),
            json.dumps({"id": "m6", "mention": "Good", "sentence": "Good"}),  # no entity_id key
        ],
    )
    write_json(tmp_path / "splits.json", {"train": ["m1", "m3", "m5", "ghost"]})
    ds = load_dataset(tmp_path)
    c = ds.report.counts
    assert [e.id for e in ds.entities] == ["Q1", "7"]
    assert ds.entities[0].images == ()
    assert c["entity.missing_image"] == 1
    assert c["entity.missing_field"] == 2
    assert c["entity.bad_json"] == 1
    assert c["entity.duplicate_id"] == 1
    assert c["entity.not_an_object"] == 1
    assert sorted(ds.mentions) == ["m1", "m3", "m5"]
    assert ds.mentions["m3"].span is None and c["mention.bad_span"] == 1
    assert ds.mentions["m5"].image is None and c["mention.missing_image"] == 1
    assert c["mention.unknown_entity"] == 1
    assert c["mention.missing_field"] == 2
    assert c["split.unknown_mention"] == 1
    assert ds.splits["train"] == ["m1", "m3", "m5"]
    # every bad line is accounted for under some reason
    assert ds.report.total == sum(c.values()) == 12
    assert ds.report.to_json()["examples"]["entity.bad_json"][0].startswith("kb.jsonl:4")


def test_iter_entities_streams(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "kb.jsonl", (Entity(f"E{i}", f"n{i}") for i in range(1000)))
    it = iter_entities(tmp_path / "kb.jsonl")
    assert next(it).id == "E0"  # a generator: nothing forces the whole file into memory
    assert sum(1 for _ in it) == 999


def test_report_merge_and_example_cap() -> None:
    a, b = RecordReport(max_examples=2), RecordReport(max_examples=2)
    for i in range(3):
        a.add("x", f"a{i}")
        b.add("x", f"b{i}")
    b.add("y", "y0")
    a.merge(b)
    assert a.counts == {"x": 6, "y": 1}
    assert a.examples["x"] == ["a0", "a1"]
    assert a.total == 7


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"kb\.jsonl"):
        load_dataset(tmp_path)


def test_find_span() -> None:
    assert find_span("turing", "Alan Turing was") == (5, 11)
    assert find_span("Hopper", "Alan Turing") is None
