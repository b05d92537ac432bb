"""The index job: build, search, shard + merge, resume, incremental add, manifest checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

import index.build as build_mod
import index.dedupe as dedupe_mod
import index.writer as writer_mod
from index import cli
from index.build import BuildConfig, add, build, finalize
from index.errors import (
    DuplicateChunkError,
    EmptyTrainingSetError,
    ForeignChunksError,
    IncompleteBuildError,
    IndexBuildError,
    InvalidShardError,
    KBNotFoundError,
    ModelMismatchError,
    ShardMismatchError,
)
from index.lexical import LEXICAL_DIR
from index.reader import KBChunk
from index.runner import Runner
from index.search import IndexSearcher
from index.store import FAISS_FILE, STORE_DIR, EntityStore, IndexMismatchError, Manifest
from models.drin_features import entity_parts
from models.encoders import ClipBackbone
from models.model import LinkingModel
from models.preprocess import entity_text

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 200, 20), (200, 30, 200)]


def _entity_lines(root: Path, start: int, n: int) -> list[str]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        images = []
        if i % 3:
            p = root / "img" / f"e{i}.png"
            Image.new("RGB", (24, 24), COLOURS[i % 5]).save(p)
            images = [f"img/e{i}.png"]
        lines.append(
            json.dumps(
                {
                    "id": f"Q{i}",
                    "name": f"Entity {i}",
                    "attributes": f"Number {i}. Colour {i % 5}.",
                    "images": images,
                }
            )
        )
    return lines


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kb")
    lines = _entity_lines(root, 0, 40)
    (root / "img" / "broken.png").write_bytes(b"not a png")
    lines[5] = json.dumps(
        {"id": "Q5", "name": "Entity 5", "attributes": "x", "images": ["img/broken.png"]}
    )  # unreadable image: no-image rule
    lines.insert(10, json.dumps({"id": "Qempty", "name": "  "}))  # empty name: counted, skipped
    lines.insert(20, "{broken json")  # counted, skipped
    lines.insert(30, json.dumps({"id": "Q7", "name": "dup"}))  # duplicate id: counted, skipped
    (root / "kb.jsonl").write_text("\n".join(lines) + "\n")
    return root / "kb.jsonl"


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "ckpt")


def _cfg(kb: Path, model_dir: Path, out: Path, **kw: object) -> BuildConfig:
    base: dict[str, object] = dict(
        kb=str(kb),
        model=str(model_dir),
        out=str(out),
        chunk_size=8,
        batch_size=5,
        workers=2,
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return BuildConfig(**base)  # type: ignore[arg-type]


def _store_bytes(folder: Path) -> dict[str, bytes]:
    store = folder / STORE_DIR
    names = [p for p in sorted(store.rglob("*")) if p.is_file()]  # with store/image/
    out = {str(p.relative_to(store)): p.read_bytes() for p in names}
    for f in ("entities.jsonl", "entities.offsets", "ids.u64", "ids.rows"):
        out[f] = (folder / f).read_bytes()
    for p in sorted((folder / LEXICAL_DIR).iterdir()):  # the lexical index, derived from them
        out[f"{LEXICAL_DIR}/{p.name}"] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def single(kb: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "idx"
    build(_cfg(kb, model_dir, out))
    return out


def test_build_load_search(single: Path, model_dir: Path, kb: Path) -> None:
    m = Manifest.load(single)
    assert m.entity_count == 40 and m.factory == "Flat" and m.metric == "inner_product"
    assert m.bad_entities["counts"] == {
        "entity.bad_json": 1,
        "entity.duplicate_id": 1,
        "entity.missing_field": 1,
        "entity.unreadable_image": 1,
    }
    # every entity: MIMIC's text-side record (dt, d, d in float16; the L x d TGLU queries as
    # int8 + a float16 scale per token) + the name vector (dt) + DRIN's text part (32) in
    # float16, + its int32 image row; once per image record: VDLU's entity side (3 d) and
    # DRIN's region score in float16, DRIN's image (32) and region (24) as int8 + one scale
    assert m.field_codecs == {"tglu_query": "q8", "drin_image": "q8", "drin_region": "q8"}
    entity_bytes = 2 * (32 + 12 + 12 + 32 + 32) + (40 * 12 + 2 * 40) + 4
    image_bytes = 2 * (3 * 12 + 1) + (32 + 2) + (24 + 2)
    assert m.store_layout == {"entity_bytes": entity_bytes, "image_bytes": image_bytes}
    # 25 entities with a readable image + the one no-image record the other 15 share
    assert m.image_count == 26 and m.version == 2
    assert m.store_bytes_per_entity == round((entity_bytes * 40 + image_bytes * 26) / 40)
    assert not (single / "chunks").exists()  # chunks removed after finalize
    model = LinkingModel.from_pretrained(model_dir)
    s = IndexSearcher(single, model.fingerprint())
    assert s.store.row_of("Q17") == 17 and s.store.row_of("nope") is None
    assert s.entity(17)["name"] == "Entity 17"
    # an "easy" mention: the entity's own text and image -> it retrieves itself
    rows = [3, 17, 22, 38]
    ents = [s.entity(r) for r in rows]
    imgs = [Image.open(kb.parent / e["images"][0]) if e["images"] else None for e in ents]
    with torch.inference_mode():
        feats = model.encoder.encode([entity_text(e["name"], e["attributes"]) for e in ents], imgs)
        cand = s.search(model.matcher.retrieval_queries(feats).numpy(), k=5)
        assert cand.rows[:, 0].tolist() == rows
        scores = model.matcher.score_precomputed(feats, s.records(cand.rows))
        assert scores.score.shape == (4, 5)
        # the store's fp16 records rerank like the fp32 direct computation
        direct = model.matcher.score(
            feats,
            model.encoder.encode(
                [
                    entity_text(s.entity(int(r))["name"], s.entity(int(r))["attributes"])
                    for r in cand.rows[0]
                ],
                [
                    Image.open(kb.parent / s.entity(int(r))["images"][0])
                    if s.entity(int(r))["images"]
                    else None
                    for r in cand.rows[0]
                ],
            ),
        )
        torch.testing.assert_close(scores.score[0], direct.score[0], rtol=0, atol=2e-2)
        # DRIN's stored entity parts equal the direct computation (fp16 storage)
        assert s.has_drin
        text = model.encoder.text_features([entity_text(e["name"], e["attributes"]) for e in ents])
        image = model.encoder.image_features(imgs)
        want = entity_parts(
            model.encoder.backbone, text, image, torch.tensor([im is not None for im in imgs])
        )
        got = s.drin_parts(np.array([rows]))
        for f in ("text", "image", "region", "region_score"):
            torch.testing.assert_close(getattr(got, f)[0], getattr(want, f), rtol=0, atol=5e-3)
        assert got.region_score[0, :, 0].tolist() == [float(im is not None) for im in imgs]
    s.close()


def test_build_without_drin_fields(kb: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "nodrin"
    m = build(_cfg(kb, model_dir, out, drin_fields=False))
    assert isinstance(m, Manifest)
    assert not any(f.startswith("drin_") for f in m.store_fields)
    assert m.store_layout == {
        "entity_bytes": 2 * (32 + 12 + 12 + 32) + (40 * 12 + 2 * 40) + 4,
        "image_bytes": 2 * 3 * 12,
    }
    s = IndexSearcher(out, LinkingModel.from_pretrained(model_dir).fingerprint())
    assert not s.has_drin
    with pytest.raises(ValueError, match="without DRIN"):
        s.drin_parts(np.array([[0]]))
    s.close()


def test_sharded_build_and_merge_equals_single(
    single: Path, kb: Path, model_dir: Path, tmp_path: Path
) -> None:
    shards = [tmp_path / f"s{i}" for i in range(3)]
    for i, d in enumerate(shards):
        build(_cfg(kb, model_dir, d, num_shards=3, shard_id=i))
    with pytest.raises(IncompleteBuildError, match="missing"):
        finalize(
            tmp_path / "partial",
            shards[:2],
            LinkingModel.from_pretrained(model_dir),
            "Flat",
            device="cpu",
        )
    finalize(
        tmp_path / "merged", shards, LinkingModel.from_pretrained(model_dir), "Flat", device="cpu"
    )
    assert _store_bytes(tmp_path / "merged") == _store_bytes(single)
    a = faiss.read_index(str(single / FAISS_FILE))
    b = faiss.read_index(str(tmp_path / "merged" / FAISS_FILE))
    q = np.random.default_rng(0).standard_normal((5, a.d)).astype(np.float32)
    assert np.array_equal(a.search(q, 7)[1], b.search(q, 7)[1])


def test_kill_and_resume_equals_clean_build(
    single: Path,
    kb: Path,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = writer_mod.write_chunk
    calls = {"n": 0}

    def dying(folder: Path, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            # a kill in the middle of writing chunk 3: a half-written .tmp folder stays behind
            folder.with_name(folder.name + ".tmp").mkdir(parents=True)
            raise KeyboardInterrupt
        real(folder, *args)

    monkeypatch.setattr(writer_mod, "write_chunk", dying)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(_cfg(kb, model_dir, out))
    assert len([p for p in (out / "chunks").iterdir() if not p.name.endswith(".tmp")]) == 2
    monkeypatch.setattr(writer_mod, "write_chunk", real)
    encoded = []
    monkeypatch.setattr(
        build_mod.ChunkEncoder, "encode", _spy(build_mod.ChunkEncoder.encode, encoded)
    )
    build(_cfg(kb, model_dir, out))
    # only chunks 2-5 were encoded again: KB lines 17-43, 27 lines of which one is broken JSON
    assert encoded == [7, 8, 8, 3]
    assert _store_bytes(out) == _store_bytes(single)


def _spy(fn, sink):  # type: ignore[no-untyped-def]
    def wrapper(self, entities, report):  # type: ignore[no-untyped-def]
        sink.append(len(entities))
        return fn(self, entities, report)

    return wrapper


def test_incremental_add_equals_rebuild(kb: Path, model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "kb2"
    base = _entity_lines(root, 0, 20)
    extra = [*_entity_lines(root, 20, 13), json.dumps({"id": "Q3", "name": "again"})]
    (root / "base.jsonl").write_text("\n".join(base) + "\n")
    (root / "extra.jsonl").write_text("\n".join(extra) + "\n")
    (root / "union.jsonl").write_text("\n".join(base + extra) + "\n")
    model = LinkingModel.from_pretrained(model_dir)
    for factory in ("Flat", "HNSW16"):
        inc, full = tmp_path / f"inc-{factory}", tmp_path / f"full-{factory}"
        build(_cfg(root / "base.jsonl", model_dir, inc, factory=factory))
        m = add(
            inc,
            str(root / "extra.jsonl"),
            model,
            batch_size=5,
            workers=2,
            chunk_size=8,
            device="cpu",
            progress=False,
        )
        assert m.entity_count == 33 and m.history[0]["added"] == 33 - 20
        assert m.bad_entities["counts"]["entity.duplicate_id"] == 1
        build(_cfg(root / "union.jsonl", model_dir, full, factory=factory))
        si, sf = EntityStore(inc), EntityStore(full)
        assert [si.entity(r)["id"] for r in range(33)] == [sf.entity(r)["id"] for r in range(33)]
        assert si.row_of("Q25") == sf.row_of("Q25") == 25
        for f in si.fields:
            np.testing.assert_allclose(si.rows(f, range(33)), sf.rows(f, range(33)), atol=2e-3)
        a = faiss.read_index(str(inc / FAISS_FILE))
        b = faiss.read_index(str(full / FAISS_FILE))
        assert a.ntotal == b.ntotal == 33
        q = np.random.default_rng(1).standard_normal((6, a.d)).astype(np.float32)
        assert np.array_equal(a.search(q, 5)[1], b.search(q, 5)[1])
        # the lexical index rebuilt by `add` is the one a full build makes
        assert m.lexical == Manifest.load(full).lexical and m.lexical["entries"] == 33
        for p in sorted((full / LEXICAL_DIR).iterdir()):
            assert (inc / LEXICAL_DIR / p.name).read_bytes() == p.read_bytes(), p.name
        si.close()
        sf.close()


def test_manifest_mismatch_is_refused(single: Path, tiny_clip_dir: Path) -> None:
    torch.manual_seed(99)
    other = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        IndexSearcher(single, other.fingerprint())


def test_hnsw_and_ivf_indexes(kb: Path, model_dir: Path, tmp_path: Path, single: Path) -> None:
    model = LinkingModel.from_pretrained(model_dir)
    flat = faiss.read_index(str(single / FAISS_FILE))
    q = np.random.default_rng(2).standard_normal((4, flat.d)).astype(np.float32)
    exact = flat.search(q, 5)[1]
    for factory in ("HNSW32", "IVF4,Flat"):
        out = tmp_path / factory.replace(",", "_")
        build(_cfg(kb, model_dir, out, factory=factory))
        s = IndexSearcher(out, model.fingerprint(), ef_search=64, nprobe=4)
        assert s.manifest.factory == factory and s.index.ntotal == 40
        # tiny index + exhaustive settings: the same neighbours as the exact index
        assert np.array_equal(s.index.search(q, 5)[1], exact)
        s.close()


def test_rebuild_reuses_a_finished_index(
    single: Path, kb: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build_mod, "encode_shard", lambda *a, **k: pytest.fail("re-encoded"))
    m = build(_cfg(kb, model_dir, single))
    assert isinstance(m, Manifest) and m.entity_count == 40


def test_copy_of_folder_loads_elsewhere(single: Path, model_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(single, moved)
    s = IndexSearcher(moved, LinkingModel.from_pretrained(model_dir).fingerprint())
    assert len(s) == 40
    s.close()


def test_hash_collisions_are_not_mistaken_for_duplicates(
    kb: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import index.store as store_mod

    # a terrible hash: every id of the same length collides; only true duplicates may be dropped
    monkeypatch.setattr(dedupe_mod, "id_hash", lambda s: len(s))
    monkeypatch.setattr(store_mod, "id_hash", lambda s: len(s))
    out = tmp_path / "collide"
    m = build(_cfg(kb, model_dir, out))
    assert isinstance(m, Manifest)
    assert m.entity_count == 40 and m.bad_entities["counts"]["entity.duplicate_id"] == 1
    s = EntityStore(out)
    assert s.row_of("Q17") == 17 and s.row_of("Q3") == 3 and s.row_of("Q99") is None
    s.close()
    extra = tmp_path / "extra.jsonl"
    extra.write_text(
        json.dumps({"id": "Q77", "name": "new"})
        + "\n"
        + json.dumps({"id": "Q12", "name": "dup of an indexed id"})
        + "\n"
    )
    m = add(
        out,
        str(extra),
        LinkingModel.from_pretrained(model_dir),
        chunk_size=8,
        device="cpu",
        progress=False,
    )
    assert m.entity_count == 41 and m.history[-1]["bad_entities"]["counts"] == {
        "entity.duplicate_id": 1
    }
    s = EntityStore(out)
    assert s.row_of("Q77") == 40 and s.entity(40)["name"] == "new"
    s.close()


def test_a_changed_kb_is_rebuilt_not_reused(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "kbchange"
    kb_file = root / "kb.jsonl"
    kb_file.parent.mkdir(parents=True)
    kb_file.write_text("\n".join(_entity_lines(root, 0, 5)) + "\n")
    out = tmp_path / "idx"
    assert Manifest.load(out).entity_count == 5 if build(_cfg(kb_file, model_dir, out)) else False
    kb_file.write_text("\n".join(_entity_lines(root, 0, 7)) + "\n")  # same path, new content
    m = build(_cfg(kb_file, model_dir, out))
    assert isinstance(m, Manifest) and m.entity_count == 7
    s = EntityStore(out)
    assert s.row_of("Q6") == 6
    s.close()


# ------------------------------------------------------- typed user errors, and the CLI's codes


@pytest.fixture(scope="module")
def small(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 5-entity KB in chunks of 2 (3 chunks), shard 0 of 2 built, shard 1 not."""
    root = tmp_path_factory.mktemp("small")
    kb_file = root / "kb.jsonl"
    kb_file.write_text("\n".join(_entity_lines(root, 0, 5)) + "\n")
    s0 = root / "s0"
    build(_cfg(kb_file, model_dir, s0, chunk_size=2, num_shards=2, shard_id=0))
    return {"root": root, "kb": kb_file, "s0": s0}


def _other_model(tiny_clip_dir: Path) -> LinkingModel:
    torch.manual_seed(99)
    return LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)


def test_library_raises_typed_errors_not_system_exit(
    small: dict[str, Path], model_dir: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    kb_file, s0 = small["kb"], small["s0"]
    model = LinkingModel.from_pretrained(model_dir)
    with pytest.raises(InvalidShardError, match=r"outside \[0, num_shards=2\)"):
        _cfg(kb_file, model_dir, tmp_path / "x", num_shards=2, shard_id=2)
    with pytest.raises(KBNotFoundError, match="no KB file at") as missing:
        build(_cfg(tmp_path / "nope.jsonl", model_dir, tmp_path / "x"))
    assert isinstance(missing.value, FileNotFoundError)  # what it was before it was typed
    with pytest.raises(ForeignChunksError, match="use a new --out"):
        build(_cfg(kb_file, model_dir, s0, chunk_size=3, num_shards=2, shard_id=0))
    with pytest.raises(IncompleteBuildError, match=r"1 chunk\(s\) missing \(e\.g\. \[1\]\)"):
        finalize(tmp_path / "m", [s0], model, "Flat", device="cpu")
    with pytest.raises(DuplicateChunkError, match="chunk 0 appears in both"):
        finalize(tmp_path / "m", [s0, s0], model, "Flat", device="cpu")
    three = tmp_path / "t1"
    build(_cfg(kb_file, model_dir, three, chunk_size=2, num_shards=3, shard_id=1))
    with pytest.raises(ShardMismatchError, match="belongs to a different build"):
        finalize(tmp_path / "m", [s0, three], model, "Flat", device="cpu")
    s1 = tmp_path / "s1"
    build(_cfg(kb_file, model_dir, s1, chunk_size=2, num_shards=2, shard_id=1))
    other = _other_model(tiny_clip_dir)
    with pytest.raises(ModelMismatchError, match="chunks were encoded by model"):
        finalize(tmp_path / "m", [s0, s1], other, "Flat", device="cpu")
    finalize(tmp_path / "m", [s0, s1], model, "Flat", device="cpu")
    with pytest.raises(IndexMismatchError, match="rebuild the index") as mismatch:
        add(tmp_path / "m", str(kb_file), other, chunk_size=2, device="cpu", progress=False)
    assert isinstance(mismatch.value, ModelMismatchError)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "x"}\n')  # no valid entity: nothing to train IVF on
    with pytest.raises(EmptyTrainingSetError, match="needs training vectors") as untrained:
        build(_cfg(empty, model_dir, tmp_path / "ivf", factory="IVF4,Flat"))
    assert isinstance(untrained.value, ValueError)
    for err in (missing, mismatch, untrained):
        assert isinstance(err.value, IndexBuildError)


def _last_line(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1]


def test_cli_turns_errors_into_exit_codes_and_messages(
    small: dict[str, Path],
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kb_file, s0 = str(small["kb"]), str(small["s0"])
    common = ["--model", str(model_dir), "--device", "cpu"]
    # a bad flag combination: argparse's usage message, exit 2, before any model is loaded
    with pytest.raises(SystemExit) as bad:
        cli.main(
            [
                "build",
                "--kb",
                kb_file,
                "--out",
                "x",
                *common,
                "--num-shards",
                "2",
                "--shard-id",
                "2",
            ]
        )
    assert bad.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mel-index")
    assert _last_line(err) == "mel-index: error: --shard-id must be in [0, --num-shards)"
    # user errors: the message alone on stderr (what SystemExit(msg) printed before), exit 1
    missing = str(tmp_path / "nope.jsonl")
    assert cli.main(["build", "--kb", missing, "--out", str(tmp_path / "x"), *common]) == 1
    assert _last_line(capsys.readouterr().err) == f"no KB file at {missing}"
    assert cli.main(["merge", "--out", str(tmp_path / "m"), *common, s0]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert _last_line(captured.err) == (
        "incomplete build: 1 chunk(s) missing (e.g. [1]); "
        "run the remaining shards (or re-run a killed one) first"
    )
    # success: the summary JSON on stdout, exit 0; the same bytes as a library build
    out = tmp_path / "cli"
    argv = ["build", "--kb", kb_file, "--out", str(out), *common, "--no-progress"]
    assert cli.main([*argv, "--chunk-size", "2", "--batch-size", "5", "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {
        "entities": 5,
        "factory": "Flat",
        "store_bytes_per_entity": Manifest.load(out).store_bytes_per_entity,
        "bad_entities": 0,
        "lexical": {"entries": 5, "grams": Manifest.load(out).lexical["grams"], "postings": 40},
    }
    lib = tmp_path / "lib"
    build(_cfg(small["kb"], model_dir, lib, chunk_size=2))
    assert _store_bytes(out) == _store_bytes(lib)
    assert (out / FAISS_FILE).read_bytes() == (lib / FAISS_FILE).read_bytes()
    # the console script installed before the CLI moved still reaches it
    assert build_mod.main(["merge", "--out", str(tmp_path / "m"), *common, s0]) == 1


def test_runner_moves_chunks_through_the_stages_in_order() -> None:
    from models.data.schema import Entity, RecordReport

    chunks = [KBChunk(c, 3, [Entity(f"Q{c}", "n")], RecordReport()) for c in range(3)]
    events: list[str] = []

    class Encoder:
        def encode(self, entities: list[Entity], report: RecordReport) -> dict[str, np.ndarray]:
            events.append(f"encode {entities[0].id}")
            return {"f": np.zeros((len(entities), 2), "<f2")}

    class Writer:
        def write(self, chunk: KBChunk, fields: dict[str, np.ndarray]) -> None:
            events.append(f"write {chunk.index} {fields['f'].shape}")

    stats = Runner(iter(chunks), Encoder(), Writer())(lambda c: events.append(f"done {c.index}"))
    assert events == [
        e for c in range(3) for e in (f"encode Q{c}", f"write {c} (1, 2)", f"done {c}")
    ]
    assert (stats.chunks, stats.lines, stats.entities) == (3, 9, 3)
    assert min(stats.read_s, stats.encode_s, stats.write_s) >= 0.0
    assert stats.seconds == stats.read_s + stats.encode_s + stats.write_s
