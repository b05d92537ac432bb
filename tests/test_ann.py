"""Retrieval at scale: the MIPS-to-L2 transform, exact refining, and both through the job."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from index.ann import (
    build_index,
    flat_ip_vectors,
    max_key_norm,
    mips_l2_dim,
    mips_to_l2,
    search,
)
from index.build import BuildConfig, add, build, retrieval_keys
from index.search import IndexSearcher, refine_rows
from index.store import EntityStore, Manifest
from models.data.demo_world import DemoWorldConfig, generate_demo_world, generate_retrieval_world
from models.encoders import ClipBackbone
from models.model import LinkingModel
from tests.test_index import _entity_lines


def _vectors(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # unequal norms, as real keys have: the case where IP and L2 orders differ
    return (rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)


def test_one_query_flat_search_is_faiss_flat_search() -> None:
    # one query on a Flat IP index goes through a numpy product (index.ann.one_query_flat):
    # the same rows in the same order as IndexFlat.search, the same scores to float rounding
    rng = np.random.default_rng(5)
    xb = rng.standard_normal((3000, 48)).astype(np.float32)
    index = faiss.IndexFlatIP(48)
    index.add(xb)
    view = flat_ip_vectors(index)
    assert view is not None and np.array_equal(view, xb)
    for k in (1, 10, 100, 3000, 5000):
        for q in rng.standard_normal((5, 48)).astype(np.float32):
            got_s, got_r = search(index, q[None], k)
            want_s, want_r = index.search(q[None], min(k, 3000))
            assert got_r.dtype == np.int64 and got_s.dtype == np.float32
            assert got_s.shape == want_s.shape == (1, min(k, 3000))
            np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
            exact = xb[got_r[0]].astype(np.float64) @ q.astype(np.float64)
            np.testing.assert_allclose(got_s[0], exact, atol=1e-4)  # each row's own score
            # the same rows in the same order, but for two rows whose scores differ in the
            # last bits only (the two products round differently)
            differ = np.flatnonzero(got_r[0] != want_r[0])
            gaps = np.abs(np.diff(want_s[0]))
            for i in differ:
                near = [gaps[j] for j in (i - 1, i) if 0 <= j < len(gaps)]
                assert min(near) < 1e-5, (k, i)
    two = rng.standard_normal((2, 48)).astype(np.float32)  # FAISS's own path from 2 queries
    np.testing.assert_array_equal(search(index, two, 7)[1], index.search(two, 7)[1])
    assert flat_ip_vectors(faiss.IndexFlatL2(48)) is None
    assert flat_ip_vectors(faiss.IndexFlatIP(48)) is None  # empty
    hnsw = faiss.IndexHNSWFlat(48, 8, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(xb[:100])
    assert flat_ip_vectors(hnsw) is None and search(hnsw, two[:1], 5)[1].shape == (1, 5)


def test_mips_to_l2_search_is_the_inner_product_search() -> None:
    keys, q = _vectors(500, 20, 0), _vectors(7, 20, 1)
    m = max_key_norm(len(keys), lambda s, e: keys[s:e], block=64)
    assert m == pytest.approx(float(np.linalg.norm(keys, axis=1).max()), rel=1e-6)
    assert mips_l2_dim(20) == 32 and mips_to_l2(keys, m).shape == (500, 32)
    ip = build_index(20, "Flat", 500, lambda s, e: keys[s:e], use_gpu=False)
    l2 = build_index(20, "Flat", 500, lambda s, e: keys[s:e], use_gpu=False, mips_l2_norm=m)
    assert l2.metric_type == faiss.METRIC_L2 and l2.d == 32
    s_ip, r_ip = search(ip, q, 25)
    s_l2, r_l2 = search(l2, q, 25, mips_l2_norm=m)
    assert np.array_equal(r_ip, r_l2)
    np.testing.assert_allclose(s_l2, s_ip, rtol=1e-4, atol=1e-3)  # the scores are q . k again
    # the L2 order is not the IP order without the transform (the test would be vacuous)
    plain = faiss.IndexFlatL2(20)
    plain.add(keys)
    assert not np.array_equal(plain.search(q, 25)[1], r_ip)


def test_refine_rows_is_the_exact_top_k_of_the_candidates() -> None:
    keys, q = _vectors(300, 12, 2), _vectors(5, 12, 3)
    rng = np.random.default_rng(4)
    cand = np.stack([rng.permutation(300)[:40] for _ in range(5)])
    cand[:, -3:] = -1  # padding a search past the index size leaves
    scores, rows = refine_rows(q, cand, lambda r: keys[r].astype(np.float16), 10)
    k16 = keys.astype(np.float16).astype(np.float32)
    for b in range(5):
        valid = cand[b][cand[b] >= 0]
        exact = k16[valid] @ q[b]
        want = valid[np.argsort(-exact, kind="stable")[:10]]
        assert np.array_equal(rows[b], want)
        np.testing.assert_allclose(scores[b], np.sort(exact)[::-1][:10], rtol=1e-5)


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    return model.save_pretrained(tmp_path_factory.mktemp("ann-model") / "ckpt")


def _cfg(kb: Path, model: Path, out: Path, **kw: object) -> BuildConfig:
    base: dict[str, object] = dict(
        kb=str(kb), model=str(model), out=str(out), chunk_size=16, batch_size=8, workers=1
    )
    base.update(progress=False, device="cpu", **kw)
    return BuildConfig(**base)  # type: ignore[arg-type]


def test_compressed_mips_l2_index_with_refine_returns_the_exact_top_k(
    model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "kb"
    (root).mkdir()
    (root / "kb.jsonl").write_text("\n".join(_entity_lines(root, 0, 120)) + "\n")
    flat, comp = tmp_path / "flat", tmp_path / "ivfpq"
    build(_cfg(root / "kb.jsonl", model_dir, flat))
    # 4 lists, 4-bit PQ: a deliberately lossy index; refine 120 = every row, so the answer
    # must be exact whatever FAISS's own order was
    m = build(
        _cfg(root / "kb.jsonl", model_dir, comp, factory="IVF4,PQ8x4", mips_l2=True, refine=120)
    )
    assert isinstance(m, Manifest)
    assert m.ann["mips_l2"] and m.ann["refine"] == 120 and m.ann["max_norm"] > 0
    model = LinkingModel.from_pretrained(model_dir)
    a = IndexSearcher(flat, model.fingerprint())
    b = IndexSearcher(comp, model.fingerprint(), nprobe=4)
    q = np.random.default_rng(5).standard_normal((6, model.matcher.retrieval_dim()))
    exact, got = a.search(q, 10), b.search(q, 10)
    assert np.array_equal(got.rows, exact.rows)
    np.testing.assert_allclose(got.retrieval, exact.retrieval, rtol=1e-5, atol=1e-5)
    # without refine the compressed index does not give the exact answer (else: vacuous)
    raw = IndexSearcher(comp, model.fingerprint(), nprobe=1, refine=0)
    assert not np.array_equal(raw.search(q, 10).rows, exact.rows)
    # retrieval.f32 holds the vectors FAISS was built from, bit for bit
    store = EntityStore(comp)
    keys = retrieval_keys(store, model, 0, len(store))
    np.testing.assert_array_equal(b.retrieval_vectors(np.arange(len(store))), keys)
    store.close()
    # an add keeps the transform: the new rows are found, refined, like the old ones
    more = tmp_path / "more.jsonl"
    more.write_text("\n".join(_entity_lines(root, 120, 10)) + "\n")
    add(comp, str(more), model, batch_size=8, workers=1, device="cpu", progress=False)
    c = IndexSearcher(comp, model.fingerprint(), nprobe=4, refine=130)
    assert c.index.ntotal == 130
    ref = faiss.IndexFlatIP(len(keys[0]))
    ref.add(c.retrieval_vectors(np.arange(130)).astype(np.float32))
    assert np.array_equal(c.search(q, 10).rows, ref.search(q.astype(np.float32), 10)[1])
    # the chosen type at scale: a graph over 4-bit codes, refined exactly from retrieval.f32
    hnsw = tmp_path / "hnsw-sq"
    build(_cfg(root / "kb.jsonl", model_dir, hnsw, factory="HNSW8_SQ4", refine=120))
    h = IndexSearcher(hnsw, model.fingerprint(), ef_search=256)  # > N: the graph reaches all
    assert np.array_equal(h.search(q, 10).rows, exact.rows)
    for s in (a, b, raw, c, h):
        s.close()


def test_refine_on_a_folder_built_without_it_is_refused(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "kb"
    root.mkdir()
    (root / "kb.jsonl").write_text("\n".join(_entity_lines(root, 0, 12)) + "\n")
    build(_cfg(root / "kb.jsonl", model_dir, tmp_path / "plain"))
    fp = LinkingModel.from_pretrained(model_dir).fingerprint()
    with pytest.raises(ValueError, match=r"refine needs retrieval\.f32"):
        IndexSearcher(tmp_path / "plain", fp, refine=50)
    IndexSearcher(tmp_path / "plain", fp).close()  # and without refine it serves as before


def test_retrieval_world_is_the_demo_world_text_only_with_its_first_queries(
    tmp_path: Path,
) -> None:
    cfg = DemoWorldConfig(num_entities=240, seed=2, workers=1)
    generate_demo_world(tmp_path / "full", cfg)
    generate_retrieval_world(tmp_path / "small", cfg, queries=30)

    def lines(p: Path) -> list[dict[str, object]]:
        return [json.loads(x) for x in p.read_text().splitlines()]

    full, small = lines(tmp_path / "full/kb.jsonl"), lines(tmp_path / "small/kb.jsonl")
    assert [{**e, "images": []} for e in full] == small
    test = json.loads((tmp_path / "full/splits.json").read_text())["test"][:30]
    by_id = {m["id"]: m for m in lines(tmp_path / "full/mentions.jsonl")}
    got = lines(tmp_path / "small/mentions.jsonl")
    assert got == [by_id[i] for i in test]
    assert json.loads((tmp_path / "small/splits.json").read_text())["test"] == test
    for m in got:
        if m["image"]:
            img = str(m["image"])
            assert (tmp_path / "small" / img).read_bytes() == (tmp_path / "full" / img).read_bytes()
    kb_images = tmp_path / "small/images/kb"
    assert not kb_images.exists() or not any(kb_images.iterdir())  # no KB image rendered
