"""The index store's version 2 layout: image fields once per image record (one shared no-image
record), per-field codecs, and version 1 folders still read (and extended) as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from index.build import BuildConfig, add, build
from index.encode import IMAGE_FIELDS
from index.search import Candidates, IndexSearcher
from index.store import (
    IMAGE_DIR,
    IMAGE_ROW_FILE,
    STORE_DIR,
    EntityStore,
    Manifest,
    StoredField,
    encode_rows,
    field_files,
    half_to_float,
    row_bytes,
)
from models.encoders import ClipBackbone
from models.mimic import MimicEntityRecord
from models.model import LinkingModel
from models.onnx_kernel import load_kernel
from models.preprocess import entity_text
from models.rerank_kernel import score_candidates
from service.primitives import EncodedMentions, MentionBatch
from service.rerankers import MimicReranker


def _kb(root: Path, start: int, n: int) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        images = []
        if i % 2:
            Image.new("RGB", (20, 20), (40 * (i % 6), 90, 200 - 10 * (i % 9))).save(
                root / "img" / f"e{i}.png"
            )
            images = [f"img/e{i}.png"]
        lines.append(
            json.dumps(
                {"id": f"E{i}", "name": f"Name {i}", "attributes": f"Attr {i}.", "images": images}
            )
        )
    path = root / f"kb{start}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layout")
    torch.manual_seed(7)
    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    return _kb(root, 0, 14), model.save_pretrained(root / "model")


def _cfg(kb: Path, model: Path, out: Path) -> BuildConfig:
    return BuildConfig(
        kb=str(kb),
        model=str(model),
        out=str(out),
        chunk_size=4,
        batch_size=3,
        workers=1,
        progress=False,
        device="cpu",
    )


def test_entities_without_an_image_share_one_record(world: tuple[Path, Path], tmp_path: Path):
    kb, model_dir = world
    out = tmp_path / "idx"
    m = build(_cfg(kb, model_dir, out))
    assert isinstance(m, Manifest)
    assert set(m.image_fields) == set(IMAGE_FIELDS)
    assert m.image_count == 1 + 7  # the no-image record + the 7 odd entities' images
    store = EntityStore(out)
    rows = np.asarray(store.image_rows)
    assert rows[0::2].tolist() == [0] * 7  # even entities: no image -> record 0
    assert sorted(rows[1::2].tolist()) == list(range(1, 8))  # one record each
    # each field's files hold exactly image_count (or entity_count) rows in its codec
    for f, shape in m.store_fields.items():
        where = out / STORE_DIR / (IMAGE_DIR if f in m.image_fields else "")
        n = m.image_count if f in m.image_fields else m.entity_count
        codec = m.field_codecs.get(f, "f16")
        size = sum((where / name).stat().st_size for name in field_files(f, codec))
        assert size == n * row_bytes(shape, codec)
    # the shared record is what a direct encoding of an entity without an image gives
    model = LinkingModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        feats = model.encoder.encode([entity_text("Name 2", "Attr 2.")], [None])
        rec = model.matcher.precompute_entities(feats)
    for f in ("e2m_query", "m2e_key", "m2e_pooled"):
        np.testing.assert_allclose(store.rows(f, [2])[0], getattr(rec, f)[0].numpy(), atol=2e-3)
    store.close()


# A q8 value (int8 x a float16 scale) rewritten as float16 rounds to float16's spacing.
F16_RTOL = 2.0**-11


def _same(x: np.ndarray, y: np.ndarray, codec: str) -> None:
    if codec == "f16":
        np.testing.assert_array_equal(x, y)
    else:
        np.testing.assert_allclose(x, y, rtol=F16_RTOL, atol=0)


def _downgrade_to_v1(src: Path, dst: Path) -> None:
    """The same folder in the version 1 layout: every field float16, once per entity."""
    shutil.copytree(src, dst)
    m = Manifest.load(dst)
    store = EntityStore(dst)
    full = {f: store.rows(f, range(m.entity_count)) for f in m.store_fields}
    store.close()
    shutil.rmtree(dst / STORE_DIR)
    (dst / STORE_DIR).mkdir()
    for f, values in full.items():
        (dst / STORE_DIR / f"{f}.f16").write_bytes(values.astype("<f2").tobytes())
    m.version, m.image_fields, m.image_count, m.field_codecs, m.store_layout = 1, [], 0, {}, {}
    m.save(dst)


def test_version_1_folders_read_and_extend_as_before(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    kb, model_dir = world
    v2 = tmp_path / "v2"
    build(_cfg(kb, model_dir, v2))
    v1 = tmp_path / "v1"
    _downgrade_to_v1(v2, v1)
    codecs = Manifest.load(v2).field_codecs
    model = LinkingModel.from_pretrained(model_dir)
    a, b = IndexSearcher(v2, model.fingerprint()), IndexSearcher(v1, model.fingerprint())
    assert a.store.image_rows is not None and b.store.image_rows is None
    rows = np.array([[0, 3, 13], [5, 2, -1]])
    for f in a.manifest.store_fields:  # every field, MIMIC's and DRIN's, by entity row
        (x,), (y,) = a.fields(rows, (f,)), b.fields(rows, (f,))
        _same(x.numpy(), y.numpy(), codecs.get(f, "f16"))
    # the image rows tell the reranking kernel which candidates have no image (none in v1)
    groups = a.image_rows(rows)
    assert b.image_rows(rows) is None and groups is not None
    ir = [int(r) for r in a.store.image_rows]  # even entities: no image, record 0
    assert groups.tolist() == [[0, ir[3], ir[13]], [ir[5], 0, 0]] and 0 not in (ir[3], ir[13])
    men = model.encoder.encode([entity_text("Name 1", "Attr 1."), "x"], [None, None])
    with torch.inference_mode():
        rec = a.records(rows)
        want = model.matcher.score_precomputed(men, rec)
        got = score_candidates(model.matcher, men, rec, no_image=torch.from_numpy(groups == 0))
    torch.testing.assert_close(got.score, want.score, rtol=0, atol=1e-5)
    a.close()
    b.close()
    # `add` keeps a version 1 folder in its own layout, and adds what a v2 folder adds
    extra = _kb(kb.parent, 14, 5)
    for folder in (v1, v2):
        add(
            folder,
            str(extra),
            model,
            batch_size=3,
            workers=1,
            chunk_size=4,
            device="cpu",
            progress=False,
        )
    m1, m2 = Manifest.load(v1), Manifest.load(v2)
    assert m1.version == 1 and not m1.image_fields and not m1.field_codecs
    assert not (v1 / STORE_DIR / IMAGE_ROW_FILE).exists()
    assert m2.entity_count == m1.entity_count == 19 and m2.image_count == 1 + 7 + 2
    s1, s2 = EntityStore(v1), EntityStore(v2)
    for f in m1.store_fields:
        old, new = s1.rows(f, range(19)), s2.rows(f, range(19))
        _same(old[:14], new[:14], codecs.get(f, "f16"))
        if codecs.get(f, "f16") == "f16":
            np.testing.assert_array_equal(old[14:], new[14:])
        else:  # added as float16 to v1, as int8 to v2: half a q8 step apart at most
            step = np.abs(old[14:]).max(axis=-1, keepdims=True) / 127
            assert (np.abs(old[14:] - new[14:]) <= step * (0.5 + 2 * F16_RTOL) + 1e-6).all()
    s1.close()
    s2.close()


def test_q8_codec_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 16)).astype(np.float32) * rng.uniform(0.01, 10, (5, 3, 1))
    x[2, 1] = 0.0  # an all-zero row keeps scale 0 and decodes to 0
    q, scale = encode_rows(x, "q8")
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (5, 3)
    for name, arr in zip(field_files("f", "q8"), (q, scale), strict=True):
        (tmp_path / name).write_bytes(arr.tobytes())
    back = StoredField(tmp_path, "f", (3, 16), 5, "q8").take(np.arange(5))
    err = np.abs(back - x)
    bound = scale.astype(np.float32)[..., None] / 2 + 1e-7  # half a step of each row's scale
    assert (err <= bound).all() and not back[2, 1].any()
    assert row_bytes((3, 16), "q8") == 3 * 16 + 2 * 3 and row_bytes((3, 16), "f16") == 96


def test_the_onnx_kernel_scores_the_stored_records_as_the_float32_read(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    """The MIMIC reranker hands the onnx kernel the store's codes (q8 and float16, gathered,
    not decoded); the scores are the float32 read's, bit for bit, on version 2 and version
    1 folders (version 1: every field float16)."""
    kb, model_dir = world
    v2 = tmp_path / "v2"
    build(_cfg(kb, model_dir, v2))
    v1 = tmp_path / "v1"
    _downgrade_to_v1(v2, v1)
    model = LinkingModel.from_pretrained(model_dir)
    men = model.encoder.encode(
        [entity_text("Name 1", "Attr 1."), entity_text("Name 4", "Attr 4.")], [None, None]
    )
    batch = MentionBatch((), EncodedMentions(men))  # the reranker reads only the encodings
    rows = np.array([[0, 3, 13, 7], [5, 2, 0, 6]])
    cand = Candidates.dense(rows, np.zeros(rows.shape, dtype=np.float32))
    for folder in (v2, v1):
        s = IndexSearcher(folder, model.fingerprint())
        codecs = s.record_codecs
        assert codecs["tglu_query"] == ("q8" if folder == v2 else "f16")
        stored = s.stored_records(rows)
        assert stored is not None
        value, scale = stored["tglu_query"]
        assert value.dtype == (np.int8 if folder == v2 else np.float16)
        assert (scale is not None) == (folder == v2) and value.shape[:2] == rows.shape
        records = s.records(rows)
        for f in MimicEntityRecord.field_names():
            t, (v, sc) = (
                getattr(records, f),
                stored[f],
            )  # StoredField.take's decode of the gathered codes
            dec = v.astype(np.float32) * (1 if sc is None else sc.astype(np.float32)[..., None])
            np.testing.assert_array_equal(dec, t.numpy(), err_msg=f)
        cache = tmp_path / "onnx"
        with_codes = load_kernel(model.matcher, "onnx", cache, 1, torch.device("cpu"), codecs)
        plain = load_kernel(model.matcher, "onnx", cache, 1, torch.device("cpu"))
        calls: list[int] = []

        def counted(*a: Any, calls: list[int] = calls, run: Any = with_codes.score_stored) -> Any:
            calls.append(1)
            return run(*a)

        with_codes.score_stored = counted  # type: ignore[method-assign]
        a = MimicReranker(model, s, with_codes).rerank(batch, cand)
        assert calls == [1]  # the stored records went to the graph that decodes them
        b = MimicReranker(model, s, plain).rerank(batch, cand)
        np.testing.assert_array_equal(a.scores, b.scores)
        with torch.inference_mode():
            want = model.matcher.score_precomputed(men, s.records(rows)).score.numpy()
        np.testing.assert_allclose(a.scores, want, rtol=0, atol=1e-5)
        # a kernel exported for other codecs than the store's gets float32 records
        other = {f: "f16" for f in codecs} if folder == v2 else {**codecs, "tglu_query": "q8"}
        mismatched = load_kernel(model.matcher, "onnx", cache, 1, torch.device("cpu"), other)
        mismatched.score_stored = lambda *a: pytest.fail("codecs differ: float32 records")  # type: ignore[method-assign]
        c = MimicReranker(model, s, mismatched).rerank(batch, cand)
        np.testing.assert_array_equal(c.scores, b.scores)
        s.close()


def test_float16_fields_decode_exactly(tmp_path: Path) -> None:
    """The float16 read converts through torch (numpy's conversion is ~10x slower): every
    float16 bit pattern, subnormals and infinities included, gives numpy's float32 bit for
    bit, and a NaN a NaN (the conversion quiets signalling NaNs, numpy keeps their bits)."""
    every = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(-1, 64)
    (tmp_path / "f.f16").write_bytes(every.tobytes())
    got = StoredField(tmp_path, "f", (64,), len(every), "f16").take(np.arange(len(every)))
    want = every.astype(np.float32)
    assert got.dtype == np.float32
    nan = np.isnan(want)
    assert nan.sum() == 2 * 1023 and np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert half_to_float(np.zeros((0, 3), dtype=np.float16)).shape == (0, 3)
