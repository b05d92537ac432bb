"""The fusion stage end to end on the tiny world: tables through the serving path, training,
and the server answering with reranker=fusion, confidences and feature contributions."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from index.encode import NAME_FIELD
from models.data.schema import load_dataset
from models.fusion import ZERO_SHOT, CandidateTable, FusionModel
from models.fusion_train import train_fusion
from service.linker import Linker
from service.primitives import MentionInput
from service.settings import ServiceSettings
from service.tables import build_table
from tests.test_service import _settings, serve


@pytest.fixture(scope="module")
def fusion_dir(
    artifacts: tuple[Path, Path], tiny_world: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fusion")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from service.tables import main; sys.exit(main(sys.argv[1:]))",
            "--data",
            str(tiny_world),
            "--model",
            str(artifacts[0]),
            "--index",
            str(artifacts[1]),
            "--candidates",
            "8",
            "--lexical",
            "4",
            "--out",
            str(root / "tables"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = train_fusion(root / "tables", root / "model", seed=0, plot=root / "rel.png")
    return root / "tables", root / "model", report


def test_tables_come_from_the_serving_path(
    fusion_dir: tuple[Path, Path, dict[str, Any]], artifacts: tuple[Path, Path], tiny_world: Path
) -> None:
    tables, _, _ = fusion_dir
    meta = json.loads((tables / "meta.json").read_text())
    assert meta["lexical"] == 4 and meta["candidates"] == 8
    assert meta["zero_shot"] == ZERO_SHOT == "mention_pass"
    test = CandidateTable.load(tables / "test")
    ds = load_dataset(tiny_world)
    assert test.ids == [m.id for m in ds.split("test")]
    # dense 8 + lexical 4: 12 slots, dense ones first, no row twice in a list
    assert test.signals.rows.shape == (len(test), 12)
    for line in test.signals.rows:
        kept = line[line >= 0]
        assert len(set(kept.tolist())) == len(kept)
    # the same mentions through a Linker directly give the same signals
    linker = Linker(_settings(artifacts))
    again = build_table(linker, ds, "test", 8, 4, progress=False)
    linker.close()
    assert np.array_equal(again.signals.rows, test.signals.rows)
    assert np.allclose(again.signals.mimic, test.signals.mimic, atol=1e-5)


def test_tables_can_take_the_surface_zero_shot_source(
    artifacts: tuple[Path, Path], tiny_world: Path
) -> None:
    linker = Linker(_settings(artifacts))
    ds = load_dataset(tiny_world)
    lead = build_table(linker, ds, "test", 8, 4, progress=False)
    alone = build_table(linker, ds, "test", 8, 4, progress=False, zero_shot="surface")
    assert np.array_equal(lead.signals.rows, alone.signals.rows)
    assert not np.allclose(lead.signals.name_cos, alone.signals.name_cos)
    # surface: the mention string encoded alone against each candidate's stored name vector
    with torch.inference_mode():
        v = linker.model.encoder.surface_features([m.mention for m in alone.mentions]).numpy()
    rows = alone.signals.rows
    flat = np.where(rows < 0, 0, rows).reshape(-1)
    names = linker.searcher.store.rows(NAME_FIELD, flat).reshape(*rows.shape, -1)
    want = np.einsum("bd,bkd->bk", v, names)
    valid = rows >= 0
    assert np.allclose(alone.signals.name_cos[valid], want[valid], atol=1e-5)
    with pytest.raises(ValueError, match="zero_shot"):
        build_table(linker, ds, "test", 8, 4, progress=False, zero_shot="elsewhere")
    linker.close()


def test_training_report_and_model(fusion_dir: tuple[Path, Path, dict[str, Any]]) -> None:
    _, model_dir, report = fusion_dir
    fusion = FusionModel.from_pretrained(model_dir)
    assert set(fusion.config.calibration) == {"fusion", "mimic", "none"}
    assert 0 <= report["fusion"]["ece"] <= 1
    assert report["nil"]["test"]["mentions"] == 10
    assert (model_dir.parent / "rel.png").stat().st_size > 1000
    assert fusion.config.nil_threshold is not None and fusion.verifier is not None
    assert fusion.config.zero_shot == "mention_pass" and fusion.config.verifier_inputs == 2
    assert report["nil"]["verifier_inputs"] == 2
    assert fusion.config.verifier_target == report["nil"]["verifier_target"] == "in_list"
    assert set(report["nil"]) >= {"dev", "test", "softmax_only", "answer_confidence_ece_full_kb"}


def test_lead_features_pool_the_templates_leading_mention_tokens(
    artifacts: tuple[Path, Path],
) -> None:
    # the vector of "[CLS] mention [SEP]" inside the mention text: the template's first
    # token, the mention's own tokens (the same ids as the mention tokenised alone: it leads
    # the template) and the one after them
    linker = Linker(_settings(artifacts))
    enc = linker.model.encoder
    items = [
        MentionInput("Jo Ames", "Jo Ames the painter spoke."),
        MentionInput("Dr. O'Neil-Smith", "Later Dr. O'Neil-Smith wrote back."),
    ]
    texts = [it.text() for it in items]
    feats = enc.text_features(texts)
    got = enc.lead_features(feats.tokens, [it.mention for it in items])
    ids = enc.backbone.tokenizer(texts)["input_ids"]
    hf = enc.backbone.tokenizer.tokenizer
    for b, it in enumerate(items):
        alone = hf(it.mention, add_special_tokens=False)["input_ids"]
        n = len(alone)
        assert ids[b, 1 : n + 1].tolist() == alone
        mean = feats.tokens[b, : n + 2].mean(0, keepdim=True)
        want = torch.nn.functional.normalize(enc.backbone.pooled_text(mean), dim=-1)[0]
        torch.testing.assert_close(got[b], want, rtol=0, atol=1e-6)
    # and it is not the mention encoded alone (that one never saw the sentence)
    alone = enc.surface_features([it.mention for it in items])
    assert float((alone * got).sum(-1).min().detach()) < 0.9999
    linker.close()


def test_the_served_zero_shot_vector_follows_the_models_source(
    artifacts: tuple[Path, Path], fusion_dir: tuple[Path, Path, dict[str, Any]]
) -> None:
    linker = Linker(_settings(artifacts, fusion_model_path=str(fusion_dir[1])))
    items = (MentionInput("Jo Ames", "Jo Ames the painter spoke."),)
    enc = linker.model.encoder
    served = linker.encode(items)
    assert served.surface is not None
    lead = enc.lead_features(served.mimic.text_tokens, ["Jo Ames"])
    torch.testing.assert_close(served.surface, lead, rtol=0, atol=1e-6)
    # a model trained before the mention-pass source reads the mention encoded alone
    assert linker.fusion is not None
    linker.fusion.config = replace(linker.fusion.config, zero_shot="surface")
    old = linker.encode(items).surface
    assert old is not None
    torch.testing.assert_close(old, enc.surface_features(["Jo Ames"]), rtol=0, atol=1e-6)
    linker.close()


_SERVED: dict[str, Path] = {}


def fusion_dir_model(base: str) -> Path:
    return _SERVED[base]


@pytest.fixture(scope="module")
def fusion_server(
    artifacts: tuple[Path, Path], fusion_dir: tuple[Path, Path, dict[str, Any]]
) -> Iterator[str]:
    with serve(_settings(artifacts, fusion_model_path=str(fusion_dir[1]))) as (base, _):
        _SERVED[base] = fusion_dir[1]
        yield base


def test_fusion_is_served_with_confidence_and_contributions(fusion_server: str) -> None:
    ready = httpx.get(f"{fusion_server}/readyz").json()
    assert ready["rerankers"][0] == "fusion" and ready["default_reranker"] == "fusion"
    assert ready["fusion_version"]
    body = {"mention": "Jo Ames", "sentence": "Jo Ames the painter spoke.", "explain": True}
    r = httpx.post(f"{fusion_server}/v1/link", json={**body, "top_k": 5}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["reranker"] == "fusion"  # the default once a fusion model is loaded
    confs = [c["confidence"] for c in out["candidates"]]
    assert all(0 <= c <= 1 for c in confs) and sum(confs) <= 1 + 1e-6
    assert confs == sorted(confs, reverse=True)  # ranked by score, calibration is monotone
    # the verifier's probability that the entity is in the list, nil decided on it, and the
    # answer confidence (never above it: a right answer needs the entity in the list)
    assert 0 <= out["answer_confidence"] <= out["in_kb_probability"] + 1e-6 <= 1 + 1e-6
    assert ready["fusion_trees"] == "compiled"  # lleaves is a dependency
    ready_thr = FusionModel.from_pretrained(fusion_dir_model(fusion_server)).config.nil_threshold
    assert out["nil"] is (out["in_kb_probability"] < ready_thr)
    ex = out["candidates"][0]["explain"]
    assert set(ex) == {"bias", "contributions", "values"}
    total = ex["bias"] + sum(ex["contributions"].values())
    assert total == pytest.approx(out["candidates"][0]["score"], abs=1e-3)
    # the other rerankers get calibrated confidences too
    m = httpx.post(f"{fusion_server}/v1/link", json={**body, "reranker": "mimic"}, timeout=30)
    assert all(c["confidence"] is not None for c in m.json()["candidates"])


def test_the_served_fast_paths_score_as_the_plain_ones(
    artifacts: tuple[Path, Path], fusion_dir: tuple[Path, Path, dict[str, Any]]
) -> None:
    # the server scores with the KB's names table and the compiled trees; without either
    # (per-name string features, LightGBM's predict) the scores are the same
    from service.primitives import LinkParams, MentionBatch
    from service.rerankers import FusionReranker

    linker = Linker(_settings(artifacts, fusion_model_path=str(fusion_dir[1])))
    try:
        fusion = linker.rerankers["fusion"]
        assert isinstance(fusion, FusionReranker)
        assert fusion.info.table is not None and len(fusion.info.table) == 16
        assert linker.fusion is not None and linker.fusion.tree_runtime == "compiled"
        items = (
            MentionInput("Jo Ames", "Jo Ames the painter spoke."),
            MentionInput("Bell", "Bell met Jo Ames in Paris."),
        )
        batch = MentionBatch(items, linker.encode(items))
        params = [LinkParams(top_k=8, candidates_k=8, reranker="fusion")] * 2

        def scores() -> list[list[tuple[str, float]]]:
            out, _ = linker.link(batch, params)
            return [[(c.entity_id, c.score) for c in r.candidates] for r in out]

        fast = scores()
        fusion.info.table = None
        linker.fusion.use_tree_runtime("lightgbm")
        plain = scores()
        assert [[e for e, _ in r] for r in fast] == [[e for e, _ in r] for r in plain]
        for f, p in zip(fast, plain, strict=True):
            np.testing.assert_allclose([s for _, s in f], [s for _, s in p], rtol=0, atol=1e-6)
    finally:
        linker.close()


def test_fusion_needs_its_mimic_model(
    artifacts: tuple[Path, Path], fusion_dir: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    cfg = json.loads((fusion_dir[1] / "config.json").read_text())
    cfg["mimic_fingerprint"] = "0000000000000000"
    other = tmp_path / "other"
    other.mkdir()
    for f in fusion_dir[1].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text(json.dumps(cfg))
    settings = ServiceSettings(
        model_path=str(artifacts[0]),
        index_path=str(artifacts[1]),
        fusion_model_path=str(other),
        device="cpu",
        use_faiss_gpu=False,
    )
    with pytest.raises(ValueError, match="retrain it"):
        Linker(settings)


def test_candidate_names_read_and_analysed_at_load(artifacts: tuple[Path, Path]) -> None:
    from index.search import IndexSearcher
    from models import lexical
    from models.model import LinkingModel
    from service.rerankers import CandidateInfoReader

    model = LinkingModel.from_pretrained(artifacts[0])
    searcher = IndexSearcher(artifacts[1], model.fingerprint())
    try:
        lexical._analyse.cache_clear()
        eager = CandidateInfoReader(searcher)  # 16 entities: read and analysed now
        assert sorted(eager.loaded) == list(range(16))
        assert lexical._analyse.cache_info().currsize >= len(
            {i.names[0] for i in eager.loaded.values()}
        )
        lazy = CandidateInfoReader(searcher, preload=0)
        assert lazy.loaded == {}
        rows = np.array([[3, 0, 15, -1], [7, 7, 2, 11]])
        assert eager(rows) == lazy(rows)
        assert eager(rows)[0][3] is None and eager(rows)[1][0].id == searcher.entity(7)["id"]
        hits = lexical._analyse.cache_info().hits
        lexical.name_features("Jo Bell", "Jo Bell spoke", None, [eager(rows)[0][0].names])
        assert lexical._analyse.cache_info().hits > hits  # the name was analysed at load
    finally:
        searcher.close()
