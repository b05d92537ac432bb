"""Full-KB scoring fast path (models/scoring.py) == MimicMatcher.score_precomputed;
retrieval-restricted ranking (models/evaluate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.data.schema import load_dataset
from models.evaluate import evaluate_split
from models.features import dataset_features
from models.metrics import candidate_ranks, gold_ranks
from models.mimic import MimicConfig, MimicFeatures, MimicMatcher, in_batch_loss
from models.model import LinkingModel
from models.scoring import (
    entity_records,
    project_rows,
    score_all_units,
    score_block,
    tglu_shared,
    vdlu_groups,
)
from tests.reference_mimic import randomise_layernorms

CFG = MimicConfig(dt=32, dv=12, tglu_hidden_dim=16, idlu_hidden_dim=16, cmfu_hidden_dim=16)
L, P = 7, 5  # text tokens, image tokens

UNIT_SETS = [
    None,  # the model's units
    ("tglu", "vdlu", "cmfu"),
    ("vdlu", "cmfu"),  # w/o TGLU
    ("tglu", "cmfu"),  # w/o VDLU
    ("tglu", "vdlu"),  # w/o CMFU
    ("tglu",),
    ("vdlu",),
    ("cmfu",),
]


def _feats(*lead: int, dtype: torch.dtype, gen: torch.Generator) -> MimicFeatures:
    def r(*s: int) -> torch.Tensor:
        return torch.randn(*lead, *s, generator=gen, dtype=dtype)

    return MimicFeatures(r(CFG.dt), r(L, CFG.dt), r(CFG.dv), r(P, CFG.dv))


def _matcher(seed: int = 0, dtype: torch.dtype = torch.float32) -> MimicMatcher:
    torch.manual_seed(seed)
    m = MimicMatcher(CFG)
    randomise_layernorms(m)
    return m.to(dtype).eval()


@pytest.mark.parametrize("units", UNIT_SETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_score_block_equals_score_precomputed(
    units: tuple[str, ...] | None, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(1)
    m = _matcher(dtype=dtype)
    men = _feats(5, dtype=dtype, gen=gen)
    rec = m.precompute_entities(_feats(37, dtype=dtype, gen=gen))
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec, units)
        # a block of 4 entities x 5 mentions: 37 entities = 9 full chunks + 1 of 1
        fast = score_block(m, men, rec, units, block_elements=4 * 5 * L * L)
        whole = score_block(m, men, rec, units)  # one chunk
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    scored = units if units is not None else CFG.units
    for f in ("score", *scored):
        torch.testing.assert_close(getattr(fast, f), getattr(ref, f), atol=tol, rtol=tol)
        torch.testing.assert_close(getattr(whole, f), getattr(ref, f), atol=tol, rtol=tol)
    for f in set(("tglu", "vdlu", "cmfu")) - set(scored):  # not computed
        assert not getattr(fast, f).any()


@pytest.mark.parametrize(("b", "n", "block"), [(1, 1, 1), (1, 13, 3), (6, 1, 1), (3, 10, 10**9)])
def test_tglu_shared_edge_shapes(b: int, n: int, block: int) -> None:
    gen = torch.Generator().manual_seed(2)
    m = _matcher(seed=3)
    men = _feats(b, dtype=torch.float32, gen=gen)
    rec = m.precompute_entities(_feats(n, dtype=torch.float32, gen=gen))
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec).tglu
        nm = m._normalise(men)
        fast = tglu_shared(
            m.tglu,
            nm.text_cls,
            nm.text_tokens,
            rec.text_cls,
            rec.tglu_cls,
            rec.tglu_query,
            block_elements=block * b * L * L,
        )
    assert fast.shape == (b, n)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_score_block_entities_without_images_and_fp16_records() -> None:
    gen = torch.Generator().manual_seed(4)
    m = _matcher(seed=5)
    men = _feats(4, dtype=torch.float32, gen=gen)
    ent = _feats(9, dtype=torch.float32, gen=gen)
    # "no image": every entity shares one image feature (the no-image rule)
    ent = MimicFeatures(
        ent.text_cls,
        ent.text_tokens,
        ent.image_cls[:1].expand(9, -1),
        ent.image_tokens[:1].expand(9, -1, -1),
    )
    rec = m.precompute_entities(ent).map(lambda t: t.half())  # as the index stores them
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec)
        fast = score_block(m, men, rec, block_elements=2 * 4 * L * L)
    torch.testing.assert_close(fast.score, ref.score, atol=1e-5, rtol=1e-5)


def test_score_block_rejects_per_mention_candidates() -> None:
    gen = torch.Generator().manual_seed(6)
    m = _matcher()
    rec = m.precompute_entities(_feats(2, 3, dtype=torch.float32, gen=gen))
    with pytest.raises(ValueError, match="shared"):
        score_block(m, _feats(2, dtype=torch.float32, gen=gen), rec)


def test_candidate_ranks_misses_and_ties() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.1], [0.2, 0.2, 0.7], [1.0, 0.0, 0.3]])
    rows = torch.tensor([[7, 3, 5], [1, 2, 0], [4, 6, 8]])
    gold = torch.tensor([7, 2, 9])  # 2nd by score; tied with row 1 (listed first); absent
    assert candidate_ranks(scores, rows, gold).tolist() == [2, 3, 0]


def _tiny_model(tiny_clip_dir: Path, seed: int = 0) -> LinkingModel:
    from models.encoders import ClipBackbone

    torch.manual_seed(seed)
    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    randomise_layernorms(model.matcher)
    return model.eval()


def test_score_all_equals_score_precomputed_on_a_dataset(
    tiny_world: Path, tiny_clip_dir: Path
) -> None:
    model = _tiny_model(tiny_clip_dir)
    ds = load_dataset(tiny_world)
    feats = dataset_features(model.encoder, ds, None, batch_size=8)
    records = entity_records(model, feats.entities)
    rows = torch.arange(len(feats.mentions))
    fast = score_all_units(model, records, feats.mentions, rows, batch_size=5, progress=False)
    with torch.inference_mode():
        text, image = feats.mentions.gather(rows, feats.mentions.first_image_rows(rows))
        ref = model.matcher.score_precomputed(model.encoder.project(text, image), records)
    for f in ("score", "tglu", "vdlu", "cmfu"):
        torch.testing.assert_close(getattr(fast, f), getattr(ref, f), atol=1e-5, rtol=1e-5)


def test_retrieval_restricted_evaluation(tiny_world: Path, tiny_clip_dir: Path) -> None:
    model = _tiny_model(tiny_clip_dir, seed=1)
    ds = load_dataset(tiny_world)
    feats = dataset_features(model.encoder, ds, None, batch_size=8)
    full = evaluate_split(model, ds, feats, "dev")
    # every entity a candidate: the same ranking as the full KB (ties broken the same way)
    every = evaluate_split(model, ds, feats, "dev", candidates=len(ds.entities))
    for k in ("H@1", "H@3", "H@5", "MRR", "MR"):
        assert every[k] == pytest.approx(full[k], abs=1e-9)
    assert every["candidates"] == len(ds.entities) and every["recall@candidates"] == 1.0

    # few candidates: the gold is reranked among the retrieved, a miss scores 0 in H@k / MRR
    few = evaluate_split(model, ds, feats, "dev", candidates=3)
    mentions = [m for m in ds.split("dev") if m.entity_id]
    gold = torch.tensor([ds.entity_row[m.entity_id] for m in mentions if m.entity_id])
    records = entity_records(model, feats.entities)
    rows = feats.mention_rows(mentions)
    with torch.inference_mode():
        text, image = feats.mentions.gather(rows, feats.mentions.first_image_rows(rows))
        men = model.encoder.project(text, image)
        q = model.matcher.retrieval_queries(men)
        cand = (q @ model.matcher.retrieval_keys(records).t()).topk(3, dim=1).indices
        mimic = model.matcher.score_precomputed(men, records).score
    inside = (cand == gold.unsqueeze(1)).any(1)
    assert few["recall@candidates"] == pytest.approx(float(inside.float().mean()))
    rr = []
    for b in range(len(mentions)):
        if not inside[b]:
            rr.append(0.0)
            continue
        s = mimic[b, cand[b]]
        g = s[(cand[b] == gold[b]).nonzero()[0, 0]]
        rr.append(1.0 / (1 + int((s > g).sum())))  # no exact ties with random weights
    assert few["MRR"] == pytest.approx(sum(rr) / len(rr), abs=1e-9)
    assert few["H@1"] == pytest.approx(sum(r == 1.0 for r in rr) / len(rr), abs=1e-9)
    # with 3 candidates every retrieved gold ranks <= 3, so H@20 is the recall
    assert few["H@20"] == pytest.approx(float(inside.float().mean()))


def test_gold_ranks_unchanged_by_fast_path(tiny_world: Path, tiny_clip_dir: Path) -> None:
    model = _tiny_model(tiny_clip_dir, seed=2)
    ds = load_dataset(tiny_world)
    feats = dataset_features(model.encoder, ds, None, batch_size=8)
    res = evaluate_split(model, ds, feats, "test", batch_size=3)
    mentions = [m for m in ds.split("test") if m.entity_id]
    gold = torch.tensor([ds.entity_row[m.entity_id] for m in mentions if m.entity_id])
    records = entity_records(model, feats.entities)
    rows = feats.mention_rows(mentions)
    with torch.inference_mode():
        text, image = feats.mentions.gather(rows, feats.mentions.first_image_rows(rows))
        ref = model.matcher.score_precomputed(model.encoder.project(text, image), records).score
    ranks = gold_ranks(ref, gold).double()
    assert res["MRR"] == pytest.approx(float((1 / ranks).mean()), abs=1e-9)
    assert res["MR"] == pytest.approx(float(ranks.mean()), abs=1e-9)


def test_score_block_gradients_equal_score() -> None:
    """Training uses score_block: the loss and every gradient equal the per-pair path's."""
    gen = torch.Generator().manual_seed(7)
    men, ent = _feats(6, dtype=torch.float32, gen=gen), _feats(6, dtype=torch.float32, gen=gen)
    grads = []
    for fast in (False, True):
        m = _matcher(seed=8).train()
        scores = (
            score_block(m, men, m.precompute_entities(ent), block_elements=2 * 6 * L * L)
            if fast
            else m.score(men, ent)
        )
        in_batch_loss(scores).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5, rtol=1e-4)


def test_vdlu_groups_mixed_images() -> None:
    """Entities sharing VDLU inputs (no image) are scored once per group, others alone."""
    gen = torch.Generator().manual_seed(9)
    m = _matcher(seed=10)
    men = _feats(3, dtype=torch.float32, gen=gen)
    ent = _feats(11, dtype=torch.float32, gen=gen)
    same = torch.tensor([0, 2, 3, 7, 10])  # five "no image" entities
    ic, it = ent.image_cls.clone(), ent.image_tokens.clone()
    ic[same], it[same] = ic[0].clone(), it[0].clone()
    ent = MimicFeatures(ent.text_cls, ent.text_tokens, ic, it)
    rec = m.precompute_entities(ent)
    groups = vdlu_groups(rec)
    assert len(groups.rows) == 11 - 4
    assert len(set(groups.inverse[same].tolist())) == 1
    assert torch.equal(groups.inverse[groups.rows], torch.arange(len(groups.rows)))
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec)
        # a VDLU chunk of one group at a time
        fast = score_block(m, men, rec, block_elements=3 * 16 // 4, groups=groups)
    for f in ("score", "vdlu"):
        torch.testing.assert_close(getattr(fast, f), getattr(ref, f), atol=1e-5, rtol=1e-5)


def test_project_rows_equals_project(tiny_world: Path, tiny_clip_dir: Path) -> None:
    model = _tiny_model(tiny_clip_dir, seed=3)
    ds = load_dataset(tiny_world)
    feats = dataset_features(model.encoder, ds, None, batch_size=8)
    ent = feats.entities
    rows = torch.tensor([0, 3, 3, 7, 15, 2])
    img = ent.random_image_rows(rows, torch.Generator().manual_seed(0))
    img[1] = 0  # one "no image" among them
    ref = model.encoder.project(*ent.gather(rows, img))
    got = project_rows(model.encoder, ent, rows, img)
    for f in ("text_cls", "text_tokens", "image_cls", "image_tokens"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), atol=1e-6, rtol=1e-6)
