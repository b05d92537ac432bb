"""DRIN's dynamic graph: batched code against a per-equation loop, batching, K=1, the loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.drin import DrinConfig, DrinInputs, DrinModel, margin_ranking_loss

CFG = DrinConfig(text_dim=10, image_dim=7, hidden=16, layers=2)


def _inputs(B: int, K: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> DrinInputs:
    g = torch.Generator().manual_seed(seed)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=dtype)

    return DrinInputs(
        r(B, CFG.text_dim),
        r(B, CFG.image_dim),
        r(B, K, CFG.text_dim),
        r(B, K, CFG.image_dim),
        torch.rand(B, K, 4, generator=g, dtype=dtype),
    )


def _model(seed: int = 0) -> DrinModel:
    torch.manual_seed(seed)
    m = DrinModel(CFG)
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a wrong LN order shows
        for layer in m.layers:
            layer.layer_norm.weight.uniform_(0.5, 1.5)
            layer.layer_norm.bias.normal_(0, 0.2)
    return m.eval()


def _lin(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _direct(m: DrinModel, x: DrinInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One mention, one candidate, one equation at a time (shared/reference/drin.md)."""
    B, K = x.entity_text.shape[:2]
    scores = torch.zeros(B, K, dtype=x.edges.dtype)
    final_edges = torch.zeros_like(x.edges)
    for b in range(B):
        mt = _lin(m.mention_text_proj, x.mention_text[b])
        mi = _lin(m.mention_image_proj, x.mention_image[b])
        et = [_lin(m.entity_text_proj, x.entity_text[b, j]) for j in range(K)]
        ei = [_lin(m.entity_image_proj, x.entity_image[b, j]) for j in range(K)]
        a = [[x.edges[b, j, t] for t in range(4)] for j in range(K)]  # tt, ti, it, ii
        for layer in m.layers:

            def act(v: torch.Tensor, layer: torch.nn.Module = layer) -> torch.Tensor:
                h = _lin(layer.w_h, v)
                h = F.layer_norm(
                    h,
                    (CFG.hidden,),
                    layer.layer_norm.weight,
                    layer.layer_norm.bias,
                    layer.layer_norm.eps,
                )
                return 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU

            new_mt = act(
                mt
                + sum(a[j][0] * et[j] for j in range(K)) / K
                + sum(a[j][1] * ei[j] for j in range(K)) / K
            )
            new_mi = act(
                mi
                + sum(a[j][2] * et[j] for j in range(K)) / K
                + sum(a[j][3] * ei[j] for j in range(K)) / K
            )
            new_et = [act(et[j] + a[j][0] * mt + a[j][2] * mi) for j in range(K)]
            new_ei = [act(ei[j] + a[j][1] * mt + a[j][3] * mi) for j in range(K)]
            d = CFG.hidden
            new_a = []
            for j in range(K):
                pairs = [(mt, et[j]), (mt, ei[j]), (mi, et[j]), (mi, ei[j])]
                new_a.append(
                    [
                        torch.sigmoid(a[j][t] + (_lin(layer.w_u, u) @ _lin(layer.w_v, v)) / d)
                        for t, (u, v) in enumerate(pairs)
                    ]
                )
            mt, mi, et, ei, a = new_mt, new_mi, new_et, new_ei, new_a
        for j in range(K):
            scores[b, j] = F.cosine_similarity(mt, et[j], dim=0)
            final_edges[b, j] = torch.stack(a[j])
    return scores, final_edges


@pytest.mark.parametrize(("B", "K"), [(1, 1), (1, 5), (3, 4)])
def test_layer_equations_match_a_direct_computation(B: int, K: int) -> None:
    m = _model().double()
    x = _inputs(B, K, seed=B * 10 + K)
    with torch.no_grad():
        out = m(x)
        ref_scores, ref_edges = _direct(m, x)
    torch.testing.assert_close(out.scores, ref_scores, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.edges_final, ref_edges, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.edges_initial, x.edges)
    assert ((out.edges_final > 0) & (out.edges_final < 1)).all()


def test_one_batch_equals_single_calls_and_large_k() -> None:
    m = _model(1)
    x = _inputs(4, 1000, seed=3, dtype=torch.float32)
    with torch.no_grad():
        batched = m(x).scores
        singles = torch.cat([m(x.map(lambda t, i=i: t[i : i + 1])).scores for i in range(4)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5)
    assert batched.shape == (4, 1000)


def test_mask_equals_running_on_the_valid_candidates_only() -> None:
    m = _model(2)
    x = _inputs(2, 6, seed=4)
    m.double()
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    with torch.no_grad():
        masked = m(x, candidate_mask=mask).scores
        first = m(x.map(lambda t: t[:1])).scores
        second = m(x.map(lambda t: t[1:2, :3] if t.dim() == 3 else t[1:2])).scores
    torch.testing.assert_close(masked[0], first[0])
    torch.testing.assert_close(masked[1, :3], second[0])
    assert torch.isinf(masked[1, 3:]).all()


def test_margin_loss_counts_every_candidate() -> None:
    s = torch.tensor([[0.9, 0.8, 0.2], [0.1, 0.5, 0.4]])
    gold = torch.tensor([0, 2])
    # row 0: max(0,.25-.9+.9)=.25, .25-.9+.8=.15, 0; row 1: .25-.4+.1=-.05->0, .35, .25
    want = (0.25 + 0.15 + 0.0 + 0.0 + 0.35 + 0.25) / 6
    assert float(margin_ranking_loss(s, gold, 0.25)) == pytest.approx(want)


def test_bad_edge_shape_is_refused() -> None:
    x = _inputs(2, 3)
    bad = DrinInputs(
        x.mention_text, x.mention_image, x.entity_text, x.entity_image, x.edges[..., :3]
    )
    with pytest.raises(ValueError, match="edges"):
        _model().double()(bad)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_a_candidates_own_image_reaches_its_score_only_through_the_mention_means(
    layers: int,
) -> None:
    """A structural property of the released graph (bipartite, scored on text vertices): e_i^j
    and its ti / ii edges reach candidate j's score only through the means over candidates
    into m_t / m_i, which every candidate shares. So permuting the entity-image side among
    the candidates leaves every score unchanged, at any depth: DRIN cannot tell two same-name
    candidates apart by their own images (the README's DRIN results discuss what this means)."""
    torch.manual_seed(0)
    m = DrinModel(DrinConfig(CFG.text_dim, CFG.image_dim, hidden=8, layers=layers)).double()
    x = _inputs(3, 7, seed=4)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    edges = x.edges.clone()
    edges[..., 1] = x.edges[:, perm, 1]  # ti
    edges[..., 3] = x.edges[:, perm, 3]  # ii
    swapped = DrinInputs(
        x.mention_text, x.mention_image, x.entity_text, x.entity_image[:, perm], edges
    )
    torch.testing.assert_close(m(swapped).scores, m(x).scores, atol=1e-12, rtol=0)
    # ... while the text side does move the scores
    text_swapped = DrinInputs(
        x.mention_text, x.mention_image, x.entity_text[:, perm], x.entity_image, x.edges
    )
    assert not torch.allclose(m(text_swapped).scores, m(x).scores)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_scores_alone_are_bit_for_bit_the_full_graphs(layers: int) -> None:
    # final_edges=False skips the last layer's image vertices and edges (they reach no score):
    # the same scores exactly, masked lists too, and no final edges
    torch.manual_seed(layers)
    m = DrinModel(dataclasses.replace(CFG, layers=layers)).eval()  # float32, as served
    for B, K in ((1, 7), (4, 30)):
        x = _inputs(B, K, seed=layers * 100 + K, dtype=torch.float32)
        mask = torch.ones(B, K, dtype=torch.bool)
        mask[0, K // 2 :] = False
        for cm in (None, mask):
            with torch.no_grad():
                full, fast = m(x, cm), m(x, cm, final_edges=False)
            assert torch.equal(full.scores, fast.scores)
            assert torch.equal(full.edges_initial, fast.edges_initial)
            assert fast.edges_final is None and full.edges_final is not None
