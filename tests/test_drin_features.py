"""DRIN inputs from the shared encoder, the reranker checkpoint, and the train / eval CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import drin_train
from models.drin_features import (
    EPS,
    MIN_ALIGNMENT_PAIRS,
    CrossModalAlignment,
    DrinEntityParts,
    DrinMentionParts,
    DrinReranker,
    DrinRerankerConfig,
    check_compatible,
    span_token_mask,
    top_regions,
)
from models.drin_train import DrinTrainConfig, eval_main, insert_gold, train_drin
from models.encoders import MiniLmEffNetBackbone
from models.metrics import candidate_ranks, drin_candidate_metrics
from models.model import LinkingModel
from models.preprocess import TextTokenizer
from models.train import TrainConfig, train


@pytest.fixture(scope="module")
def minilm_tokenizer() -> TextTokenizer:
    from transformers import AutoTokenizer

    text_dir, _ = MiniLmEffNetBackbone.package_paths()
    return TextTokenizer(AutoTokenizer.from_pretrained(text_dir, local_files_only=True), 40)


def _tokens(tok: TextTokenizer, text: str, mask: torch.Tensor) -> list[str]:
    ids = tok([text])["input_ids"][0]
    return tok.tokenizer.convert_ids_to_tokens(ids[mask].tolist())


def test_span_mask_picks_the_span_in_the_sentence(minilm_tokenizer: TextTokenizer) -> None:
    tok = minilm_tokenizer
    sent = "Yesterday Michael Jordan scored forty points."
    mask = span_token_mask(tok, ["Jordan"], [sent], [(18, 24)])
    # the occurrence inside the sentence (after [SEP]), not the leading copy
    assert _tokens(tok, "Jordan [SEP] " + sent, mask[0]) == ["jordan"]
    assert int(mask[0].nonzero()[0]) > 2
    # no span given: found in the sentence, case-insensitively
    found = span_token_mask(tok, ["michael jordan"], [sent], [None])
    assert _tokens(tok, "michael jordan [SEP] " + sent, found[0]) == ["michael", "jordan"]
    assert int(found[0].nonzero()[0]) > 3


def test_span_mask_falls_back_to_the_leading_copy(minilm_tokenizer: TextTokenizer) -> None:
    tok = minilm_tokenizer
    long = " ".join(["word"] * 60) + " Jordan"  # the span is truncated away at 40 tokens
    absent = "Nobody is named here."
    mask = span_token_mask(tok, ["Jordan", "Air Jordan"], [long, absent], [None, None])
    assert mask[0].nonzero().flatten().tolist() == [1]
    assert mask[1].nonzero().flatten().tolist() == [1, 2]


def test_top_regions_scores_by_activation_norm() -> None:
    tokens = torch.zeros(1, 5, 3)
    tokens[0, 1] = torch.tensor([0.0, 4.0, 0.0])
    tokens[0, 3] = torch.tensor([2.0, 0.0, 0.0])
    tokens[0, 4] = torch.tensor([0.0, 0.0, 1.0])
    regions, scores = top_regions(tokens, 3)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.5, 0.25]]))
    torch.testing.assert_close(regions[0], torch.eye(3)[[1, 0, 2]])
    regions, scores = top_regions(tokens[:, :2], 3)  # fewer tokens than k
    assert regions.shape == (1, 2, 3)


def _parts(B: int, K: int, dt: int = 6, dg: int = 5, dr: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float64)

    m = DrinMentionParts(
        r(B, dt),
        r(B, dt),
        r(B, dg),
        F.normalize(r(B, 3, dr), dim=-1),
        torch.rand(B, 3, generator=g, dtype=torch.float64),
    )
    e = DrinEntityParts(
        r(B, K, dt),
        r(B, K, dg),
        F.normalize(r(B, K, dr), dim=-1),
        torch.ones(B, K, 1, dtype=torch.float64),
    )
    return m, e


def _reranker(dt: int = 6, dg: int = 5, dr: int = 4) -> DrinReranker:
    torch.manual_seed(0)
    from models.drin import DrinConfig

    cfg = DrinRerankerConfig(DrinConfig(dt, dg, hidden=8), "minilm-effnet", dr, "ridge")
    model = DrinReranker(cfg).double()
    with torch.no_grad():
        model.align.proj.weight.normal_()
        model.align.proj.bias.normal_()
    return model


def test_initial_edges_follow_the_formulas() -> None:
    model = _reranker()
    m, e = _parts(2, 3)
    e = DrinEntityParts(
        e.text, e.image, e.region, torch.tensor([[[1.0], [0.0], [1.0]]] * 2, dtype=torch.float64)
    )
    m = DrinMentionParts(
        m.span_text,
        m.text,
        m.image,
        m.regions,
        m.region_scores * torch.tensor([[1.0], [0.0]], dtype=torch.float64),
    )
    edges = model.initial_edges(m, e)
    A = model.align
    for b in range(2):
        for k in range(3):
            e_img = float(e.region_score[b, k, 0] > 0)
            m_img = float(m.region_scores[b].sum() > 0)
            tt = F.cosine_similarity(m.span_text[b], e.text[b, k], dim=0)
            ti = F.cosine_similarity(m.text[b], A(e.image[b, k]), dim=0) * e_img
            it = F.cosine_similarity(A(m.image[b]), e.text[b, k], dim=0) * m_img
            num = den = 0.0
            for i in range(3):
                w = m.region_scores[b, i] * e.region_score[b, k, 0]
                num += w * torch.dot(m.regions[b, i], e.region[b, k])
                den += w
            ii = num / (den + EPS)
            torch.testing.assert_close(
                edges[b, k],
                torch.stack([tt, ti, it, torch.as_tensor(ii, dtype=torch.float64)]),
                atol=1e-10,
                rtol=0,
            )
    # no image on either side: the edges that touch it are 0
    assert edges[1, :, 2].abs().max() == 0 and edges[1, :, 3].abs().max() == 0
    assert edges[:, 1, 1].abs().max() == 0 and edges[:, 1, 3].abs().max() == 0


def test_reranker_batching_equals_single_calls_and_handles_k1() -> None:
    model = _reranker().eval()
    m, e = _parts(4, 7, seed=3)
    full = model(m, e).scores
    for b in range(4):
        one = model(m.map(lambda t, b=b: t[b : b + 1]), e.map(lambda t, b=b: t[b : b + 1])).scores
        torch.testing.assert_close(one[0], full[b], atol=1e-12, rtol=0)
    k1 = model(m, e.map(lambda t: t[:, :1]))
    assert k1.scores.shape == (4, 1) and torch.isfinite(k1.scores).all()


def test_alignment_ridge_recovers_a_linear_map() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = F.normalize(x @ w, dim=-1)
    a = CrossModalAlignment("ridge", 6, 4).double()
    assert a.fit(x, y, ridge=1e-6) == 400
    pred = a(x)
    assert F.cosine_similarity(pred, y, dim=-1).min() > 0.9
    b = CrossModalAlignment("ridge", 6, 4)
    assert b.fit(x[: MIN_ALIGNMENT_PAIRS - 1].float(), y[: MIN_ALIGNMENT_PAIRS - 1].float()) == 0
    assert b(x.float()).abs().max() == 0  # too few pairs: ti / it stay 0
    with pytest.raises(ValueError):
        CrossModalAlignment("native", 6, 4)


def test_candidate_ranks_and_metrics() -> None:
    cand = torch.tensor([[5, 6, 7], [1, 2, 3], [9, 8, 4]])
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [1.0, 0.0, 0.5]])
    gold = torch.tensor([7, 1, 0])
    ranks = candidate_ranks(scores, cand, gold)
    assert ranks.tolist() == [2, 1, 0]  # ties keep the retrieval order; 0 = not retrieved
    m = drin_candidate_metrics(ranks, 3)
    assert m["Top-1"] == pytest.approx(1 / 3) and m["recall@3"] == pytest.approx(2 / 3)
    assert m["MRR"] == pytest.approx((0.5 + 1.0) / 3)
    lists, col = insert_gold(cand, gold)
    assert lists.tolist() == [[5, 6, 7], [1, 2, 3], [9, 8, 0]] and col.tolist() == [2, 0, 2]


def test_train_and_eval_drin_end_to_end(
    tiny_world: Path, tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DRIN trains under torch's deterministic kernels (models.fit.reproducible), then restores
    deterministic_during: list[bool] = []
    real_fit = drin_train.fit_alignment

    def spy_fit(*args: object, **kw: object) -> int:
        deterministic_during.append(torch.are_deterministic_algorithms_enabled())
        return real_fit(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(drin_train, "fit_alignment", spy_fit)
    cache = tmp_path / "cache"
    mimic = tmp_path / "mimic"
    train(
        TrainConfig(
            data=str(tiny_world),
            out=str(mimic),
            backend="clip",
            clip_path=str(tiny_clip_dir),
            dv=8,
            hidden=12,
            epochs=2,
            batch_size=8,
            lr=3e-3,
            val_every=2,
            seed=1,
            workers=2,
            cache_dir=str(cache),
            progress=False,
        )
    )
    out = tmp_path / "drin"
    summary = train_drin(
        DrinTrainConfig(
            data=str(tiny_world),
            model=str(mimic / "best"),
            out=str(out),
            candidates=4,
            eval_candidates=8,
            hidden=16,
            epochs=3,
            batch_size=8,
            patience=5,
            cache_dir=str(cache),
            progress=False,
        )
    )
    assert summary["epochs_run"] == 3
    assert deterministic_during == [True] and not torch.are_deterministic_algorithms_enabled()
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 3 and all("Top-1" in h["val"] for h in hist)
    drin = DrinReranker.from_pretrained(out / "best")
    assert drin.config.alignment == "native" and drin.config.drin.hidden == 16
    res = tmp_path / "eval.json"
    assert (
        eval_main(
            [
                "--data",
                str(tiny_world),
                "--model",
                str(mimic / "best"),
                "--drin",
                str(out / "best"),
                "--candidates",
                "8",
                "--cache-dir",
                str(cache),
                "--out",
                str(res),
            ]
        )
        == 0
    )
    metrics = json.loads(res.read_text())
    assert metrics["candidates"] == 8 and metrics["mentions"] == 10
    for name in ("drin", "mimic", "retrieval"):
        assert set(metrics[name]) == {"Top-1", "Top-5", "MRR", "recall@8"}
        assert metrics[name]["recall@8"] == metrics["retrieval"]["recall@8"]
    # another backbone's DRIN checkpoint is refused
    other = LinkingModel.from_pretrained(mimic / "best")
    drin.meta["backbone_weights"] = "clip:0000"
    with pytest.raises(ValueError, match="backbone"):
        check_compatible(drin, other)
