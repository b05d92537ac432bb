"""Converters from the MIMIC and MELBench layouts to the canonical format.

Fixtures live in tests/fixtures/{mimic,melbench}: tiny hand-written JSON files, 8x8 JPEGs and one
corrupt image, each bad record placed on purpose (the expected counts below name them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from models.data.converters import convert_melbench, convert_mimic, gapped_span
from models.data.schema import Entity, Mention, iter_entities, iter_mentions, load_dataset
from models.data_cli import main as mel_data

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MIMIC = FIXTURES / "mimic"
MELBENCH = FIXTURES / "melbench"
REAL_WIKIMEL = Path(__file__).resolve().parents[2] / "shared/data/wikimel"

MIMIC_BAD = {
    "entity.duplicate_id": 1,  # second id 1 ("Paris again")
    "entity.missing_field": 1,  # id 3 has no entity_name
    "entity.missing_image": 1,  # Paris lists gone.jpg
    "entity.no_qid": 1,  # id 2 is not in qid2id.json
    "entity.unreadable_image": 1,  # Paris lists broken.jpg
    "mention.duplicate_id": 1,  # test "t1" repeats train "t1"
    "mention.missing_field": 1,  # t4 has no "mentions"
    "mention.missing_image": 1,  # d2 -> gone.jpg
    "mention.no_span": 1,  # x2: "Mourinho" is not in its sentence
    "mention.unknown_entity": 1,  # t5 -> Q999
    "mention.unreadable_image": 1,  # d1 -> bad.jpg
}
MELBENCH_BAD = {
    "entity.missing_field": 1,  # Q5 has attributes but no name
    "entity.name_without_attributes": 1,  # Q4 has a name but no attributes
    "mention.missing_field": 1,  # 108-0 is ""
    "mention.unknown_entity": 1,  # 104-0 -> Q404
    "mention.unreadable_image": 1,  # 105.jpg is not a JPEG
    "sample.duplicate_key": 1,  # "101" appears twice (the first wins)
    "sample.id_mismatch": 1,  # key 106, id "999"
    "sample.length_mismatch": 1,  # 102: 2 mentions, 1 answer
    "sample.missing_field": 1,  # 103 has no sentence
    "sample.not_in_split": 1,  # 107
    "split.duplicate_sample": 1,  # 100 in test and train
    "split.unknown_sample": 1,  # dev lists 777
}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def mimic_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("mimic") / "canon"
    report = convert_mimic(MIMIC, out)
    return out, dict(report.counts)


@pytest.fixture(scope="module")
def melbench_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("melbench") / "canon"
    report = convert_melbench(MELBENCH, out)
    return out, dict(report.counts)


# ------------------------------------------------------------------------------------- MIMIC


def test_mimic_entities(mimic_out: tuple[Path, dict[str, int]]) -> None:
    out, _ = mimic_out
    assert list(iter_entities(out / "kb.jsonl")) == [
        # sorted by the authors' int id; names URL-unquoted; image order kept (2 before 1)
        Entity(
            "Q42",
            "Douglas Adams",
            "Sex: male. Occupation: writer.",
            ("images/kb/adams_2.jpg", "images/kb/adams_1.jpg"),
        ),
        Entity("Q90", "Paris", "Capital of France.", ("images/kb/paris.jpg",)),
        Entity("id:2", "Orphan", "No QID for this one.", ()),
        Entity("Q1", "José Mourinho", "Occupation: football manager.", ()),
        Entity("Q5", "Hermann von Beckerath", "Occupation: banker.", ()),
    ]


def test_mimic_mentions_and_splits(mimic_out: tuple[Path, dict[str, int]]) -> None:
    out, _ = mimic_out
    assert list(iter_mentions(out / "mentions.jsonl")) == [
        # imgPath ".../m1.png" -> m1.jpg, the authors' mapping
        Mention(
            "t1",
            "Douglas Adams",
            "Douglas Adams wrote the Guide.",
            (0, 13),
            "images/mentions/m1.jpg",
            "Q42",
        ),
        Mention("train-1", "Paris", "She moved to paris in 1990.", (13, 18), None, "Q90"),
        Mention("t3", "Atlantis", "Atlantis sank.", (0, 8), None, None),  # "nil"
        Mention("d1", "Adams", "Adams in 1979.", (0, 5), None, "Q42"),  # corrupt image dropped
        Mention("d2", "José", "José won again.", (0, 4), None, "Q1"),  # missing image dropped
        # duplicate id renamed; span over the dropped "von"; "imgs/v2.v1.jpeg" -> v2.jpg
        Mention(
            "test-0",
            "Hermann Beckerath",
            "Hermann von Beckerath spoke.",
            (0, 21),
            "images/mentions/v2.jpg",
            "Q5",
        ),
        Mention("x2", "Mourinho", "The manager left.", None, None, "Q1"),
    ]
    splits = json.loads((out / "splits.json").read_text())
    assert splits == {
        "train": ["t1", "train-1", "t3"],
        "dev": ["d1", "d2"],
        "test": ["test-0", "x2"],
    }


def test_mimic_bad_records(mimic_out: tuple[Path, dict[str, int]]) -> None:
    out, counts = mimic_out
    assert counts == MIMIC_BAD
    meta = json.loads((out / "meta.json").read_text())
    assert meta["report"]["counts"] == MIMIC_BAD
    assert meta["images"] == "symlink"
    assert meta["stats"]["entities_with_image"] == 2
    assert meta["stats"]["spans_gapped"] == 1


def test_mimic_round_trip(mimic_out: tuple[Path, dict[str, int]]) -> None:
    out, _ = mimic_out
    ds = load_dataset(out)
    assert ds.report.total == 0
    assert ds.summary() == {
        "entities": 5,
        "entities_with_image": 2,
        "mentions": 7,
        "mentions_with_image": 2,
        "nil_mentions": 1,
        "splits": {"train": 3, "dev": 2, "test": 2},
        "bad_records": sum(MIMIC_BAD.values()),  # the converter's, from meta.json
    }
    assert ds.all_problems().counts == MIMIC_BAD
    first = ds.entities[ds.entity_row["Q42"]].images[0]
    assert ds.resolve(first).read_bytes() == (MIMIC / "kb_image/adams_2.jpg").read_bytes()


def test_mimic_explicit_inputs(tmp_path: Path) -> None:
    # Split files named explicitly (relative to src) and a mention image folder that does not
    # exist: every referenced mention image is then counted missing, none crashes.
    report = convert_mimic(
        MIMIC,
        tmp_path / "out",
        kb_file=MIMIC / "kb_entity.json",
        qid2id_file="qid2id.json",
        split_files={"train": "WIKIMEL_train.json"},
        mention_image_dir=tmp_path / "nowhere",
    )
    assert report.counts["mention.missing_image"] == 4  # m1, bad, gone and v2
    assert "mention.unreadable_image" not in report.counts
    assert not (tmp_path / "out/images/mentions").exists()
    ds = load_dataset(tmp_path / "out")
    assert ds.report.total == 0
    assert sum(1 for m in ds.mentions.values() if m.image) == 0


def test_mimic_ambiguous_split_files(tmp_path: Path) -> None:
    for f in ("kb_entity.json", "qid2id.json", "WIKIMEL_train.json"):
        (tmp_path / f).write_bytes((MIMIC / f).read_bytes())
    (tmp_path / "train_small.json").write_text("[]")
    with pytest.raises(ValueError, match="several train files"):
        convert_mimic(tmp_path, tmp_path / "out")
    report = convert_mimic(
        tmp_path, tmp_path / "out", split_files={"train": str(tmp_path / "WIKIMEL_train.json")}
    )
    assert report.counts["mention.unknown_entity"] == 1


def test_output_must_not_be_source() -> None:
    with pytest.raises(ValueError, match="source folder"):
        convert_melbench(MELBENCH, MELBENCH)


# ---------------------------------------------------------------------------------- MELBench


def test_melbench_entities(melbench_out: tuple[Path, dict[str, int]]) -> None:
    out, _ = melbench_out
    assert list(iter_entities(out / "kb.jsonl")) == [
        Entity("Q1", "Stefanie Powers", "Sex: female. Occupation: actress."),
        Entity("Q2", "Noel Harrison", "Sex: male. Occupation: actor, singer."),
        Entity("Q3", "Paris", "Capital of France."),
    ]


def test_melbench_mentions_and_splits(melbench_out: tuple[Path, dict[str, int]]) -> None:
    out, _ = melbench_out
    image = "images/mentions/100.jpg"
    assert list(iter_mentions(out / "mentions.jsonl")) == [
        # one image per sample, shared by its mentions
        Mention(
            "100-0", "Noel Harrison", "Powers with Noel Harrison in Paris", (12, 25), image, "Q2"
        ),
        Mention("100-1", "Powers", "Powers with Noel Harrison in Paris", (0, 6), image, "Q1"),
        Mention("101-0", "Earl Paris", "The Earl of Paris in 1850", (4, 17), None, "Q3"),
        Mention("105-0", "Stefanie Powers", "Stefanie Powers on stage", (0, 15), None, "Q1"),
        Mention("106-0", "Harrison", "Harrison sings", (0, 8), None, "Q2"),
        Mention("107-0", "Paris", "Paris at night", (0, 5), None, "Q3"),
        Mention("108-1", "Paris", "Paris and nothing", (0, 5), None, "Q3"),
    ]
    splits = json.loads((out / "splits.json").read_text())
    # train / dev / test order; sample 100 stays in test, where splits.json lists it first
    assert list(splits) == ["train", "dev", "test"]
    assert splits == {
        "train": ["101-0"],
        "dev": ["105-0", "106-0"],
        "test": ["108-1", "100-0", "100-1"],
    }


def test_melbench_bad_records(melbench_out: tuple[Path, dict[str, int]]) -> None:
    out, counts = melbench_out
    assert counts == MELBENCH_BAD
    meta = json.loads((out / "meta.json").read_text())
    assert meta["report"]["counts"] == MELBENCH_BAD
    assert meta["stats"]["unused_source_images"] == 2  # 555.jpg, and 105.jpg (unreadable)
    assert meta["stats"]["train_samples"] == 3


def test_melbench_round_trip(melbench_out: tuple[Path, dict[str, int]]) -> None:
    out, _ = melbench_out
    ds = load_dataset(out)
    assert ds.report.total == 0
    assert ds.summary()["mentions_with_image"] == 2
    assert [m.id for m in ds.split("test")] == ["108-1", "100-0", "100-1"]


# -------------------------------------------------------------------------------------- images


def test_symlink_mode(
    mimic_out: tuple[Path, dict[str, int]], melbench_out: tuple[Path, dict[str, int]]
) -> None:
    out, _ = mimic_out
    for sub, src in (("kb", MIMIC / "kb_image"), ("mentions", MIMIC / "mention_image")):
        link = out / "images" / sub
        assert link.is_symlink()
        assert Path(link.readlink()).is_absolute()  # works wherever the dataset is read from
        assert link.resolve() == src.resolve()
    out, _ = melbench_out
    assert (out / "images/mentions").is_symlink()
    assert not (out / "images/kb").exists()  # MELBench has no entity images


def test_copy_mode_and_reconversion(tmp_path: Path) -> None:
    before = _listing(MIMIC)
    out = tmp_path / "canon"
    convert_mimic(MIMIC, out)  # links first: copying afterwards must not write through them
    report = convert_mimic(MIMIC, out, copy_images=True)
    assert dict(report.counts) == MIMIC_BAD
    assert not (out / "images/kb").is_symlink()
    assert _listing(out / "images") == [
        "kb",
        "kb/adams_1.jpg",
        "kb/adams_2.jpg",
        "kb/paris.jpg",
        "mentions",
        "mentions/m1.jpg",
        "mentions/v2.jpg",
    ]
    assert _listing(MIMIC) == before
    assert json.loads((out / "meta.json").read_text())["images"] == "copy"
    assert load_dataset(out).report.total == 0
    convert_mimic(MIMIC, out)  # and back to links
    assert (out / "images/kb").is_symlink()
    assert load_dataset(out).report.total == 0

    report = convert_melbench(MELBENCH, tmp_path / "mb", copy_images=True)
    assert dict(report.counts) == MELBENCH_BAD
    assert _listing(tmp_path / "mb/images") == ["mentions", "mentions/100.jpg"]


# --------------------------------------------------------------------------------------- spans


@pytest.mark.parametrize(
    ("mention", "sentence", "expected"),
    [
        ("Hermann Beckerath", "Hermann von Beckerath.", "Hermann von Beckerath"),
        ("Earl Aberdeen", "The Earl of Aberdeen in the 1850s", "Earl of Aberdeen"),
        ("Francisco Paula Rosa", "Francisco de Paula de la Rosa", "Francisco de Paula de la Rosa"),
        (
            "John Moulton Baron Moulton",
            "John Moulton, Baron Moulton, c. 1913",
            "John Moulton, Baron Moulton",
        ),
        ("earl aberdeen", "EARL OF ABERDEEN", "EARL OF ABERDEEN"),
    ],
)
def test_gapped_span_finds(mention: str, sentence: str, expected: str) -> None:
    span = gapped_span(mention, sentence)
    assert span is not None
    assert sentence[span[0] : span[1]] == expected


@pytest.mark.parametrize(
    ("mention", "sentence"),
    [
        ("Mohammad Rajai", "Rajai and Prime Minister Mohammad Bahonar"),  # wrong order
        ("Ann Smith", "Ann went to the old Smith farm"),  # four words apart
        ("Paris", "Parisian cafes"),  # one word: plain find_span's job
        ("Earl Aberdeen", "Earlier at Aberdeen"),  # whole words only
    ],
)
def test_gapped_span_rejects(mention: str, sentence: str) -> None:
    assert gapped_span(mention, sentence) is None


# ---------------------------------------------------------------------------------------- CLI


def test_cli_converters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        mel_data(["convert-melbench", "--src", str(MELBENCH), "--out", str(tmp_path / "mb")]) == 0
    )
    assert json.loads(capsys.readouterr().out)["counts"] == MELBENCH_BAD
    assert (
        mel_data(
            ["convert-mimic", "--src", str(MIMIC), "--out", str(tmp_path / "mi"), "--copy-images"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["counts"] == MIMIC_BAD
    assert (tmp_path / "mi/images/kb/paris.jpg").is_file()


# ---------------------------------------------------------------------------------- real data


@pytest.mark.skipif(
    not (REAL_WIKIMEL / "Wikidata-MEL.json").is_file(),
    reason="real WikiMEL data not present at ../shared/data/wikimel",
)
def test_real_wikimel(tmp_path: Path) -> None:
    started = time.perf_counter()
    report = convert_melbench(REAL_WIKIMEL, tmp_path / "wikimel")
    assert time.perf_counter() - started < 20
    # The known oddities: 2,281 split entries name samples absent from Wikidata-MEL.json, and
    # a handful of mentions whose words are not in their sentence.
    assert report.counts["split.unknown_sample"] == 2281
    assert set(report.counts) <= {"split.unknown_sample", "mention.no_span"}
    assert report.counts["mention.no_span"] < 20
    ds = load_dataset(tmp_path / "wikimel")
    assert ds.report.total == 0
    assert len(ds.entities) == 18_880
    assert len(ds.mentions) == 25_846
    meta = ds.meta["stats"]
    assert (meta["train_samples"], meta["dev_samples"], meta["test_samples"]) == (
        15_511,
        2_213,
        4_412,
    )
    assert sum(len(v) for v in ds.splits.values()) == 25_846
    with_image = {m.image for m in ds.mentions.values() if m.image}
    assert 35 <= len(with_image) <= 45
    assert all(ds.resolve(p).is_file() for p in with_image)
