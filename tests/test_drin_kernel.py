"""The DRIN serving kernel (models/drin_kernel.py) against the graph as released."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.drin import DrinConfig
from models.drin_features import (
    DrinEntityParts,
    DrinMentionParts,
    DrinReranker,
    DrinRerankerConfig,
)
from models.drin_kernel import DrinKernel, EntityTable


def _model(
    layers: int, dt: int = 6, dg: int = 5, dr: int = 4, hidden: int = 8, dtype=torch.float64
) -> DrinReranker:
    torch.manual_seed(layers)
    cfg = DrinRerankerConfig(
        DrinConfig(dt, dg, hidden=hidden, layers=layers), "minilm-effnet", dr, "ridge"
    )
    model = DrinReranker(cfg).to(dtype).eval()
    with torch.no_grad():
        model.align.proj.weight.normal_(std=dg**-0.5)
        model.align.proj.bias.normal_()
    return model


def _parts(
    B: int,
    K: int,
    dt: int = 6,
    dg: int = 5,
    dr: int = 4,
    seed: int = 0,
    groups: torch.Tensor | None = None,
    dtype=torch.float64,
) -> tuple[DrinMentionParts, DrinEntityParts]:
    """Random parts; with ``groups`` (B, K) the candidates of a group share one image (group 0:
    no image, as the store's image record 0)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=dtype)

    m = DrinMentionParts(
        r(B, dt),
        r(B, dt),
        r(B, dg),
        F.normalize(r(B, 3, dr), dim=-1),
        torch.rand(B, 3, generator=g, dtype=dtype),
    )
    if groups is None:
        e = DrinEntityParts(
            r(B, K, dt),
            r(B, K, dg),
            F.normalize(r(B, K, dr), dim=-1),
            torch.rand(B, K, 1, generator=g, dtype=dtype),
        )
    else:
        n = int(groups.max()) + 1
        score = torch.rand(n, 1, generator=g, dtype=dtype)
        score[0] = 0.0
        e = DrinEntityParts(
            r(B, K, dt),
            r(n, dg)[groups],
            F.normalize(r(n, dr), dim=-1)[groups],
            score[groups],
        )
    return m, e


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_kernel_scores_equal_the_graph(layers: int) -> None:
    model = _model(layers)
    kernel = DrinKernel(model)
    m, e = _parts(3, 7, seed=layers)
    ref = model(m, e, final_edges=False)
    scores, edges = kernel(m, e)
    torch.testing.assert_close(scores, ref.scores, atol=1e-12, rtol=0)
    torch.testing.assert_close(edges, ref.edges_initial, atol=0, rtol=0)
    # fewer valid candidates than K: the means run over the valid ones, the rest are -inf
    mask = torch.tensor([[True] * 7, [True, False] * 3 + [True], [True] + [False] * 6])
    ref = model(m, e, mask, final_edges=False)
    scores, _ = kernel(m, e, mask)
    assert torch.isinf(scores[~mask]).all() and (scores[~mask] < 0).all()
    torch.testing.assert_close(scores[mask], ref.scores[mask], atol=1e-12, rtol=0)


@pytest.mark.parametrize("layers", [1, 2])
def test_image_groups_give_the_same_scores(layers: int) -> None:
    model = _model(layers)
    groups = torch.tensor([[0, 1, 0, 2, 0], [2, 2, 0, 0, 3]])
    m, e = _parts(2, 5, seed=5, groups=groups)
    ref = model(m, e, final_edges=False)
    for g in (groups, None):
        scores, edges = DrinKernel(model)(m, e, None, g)
        torch.testing.assert_close(scores, ref.scores, atol=1e-12, rtol=0)
        torch.testing.assert_close(edges, ref.edges_initial, atol=1e-12, rtol=0)


def test_each_distinct_image_is_projected_and_aligned_once() -> None:
    model = _model(2)
    kernel = DrinKernel(model)
    rows_aligned: list[int] = []
    model.align.register_forward_hook(lambda mod, inp, out: rows_aligned.append(inp[0].shape[0]))
    groups = torch.zeros(4, 30, dtype=torch.long)  # every candidate imageless: one record
    groups[1, 3] = 7
    m, e = _parts(4, 30, seed=2, groups=groups)
    ref = model(m, e, final_edges=False)
    rows_aligned.clear()
    scores, _ = kernel(m, e, None, groups)
    torch.testing.assert_close(scores, ref.scores, atol=1e-12, rtol=0)
    # the entity images (2 distinct records), then the mention images (4) for the it edge
    assert rows_aligned == [2, 4]


def test_float32_at_serving_widths_within_1e5() -> None:
    """fp32 at the MiniLM + EfficientNet widths: the folded products round differently from
    the graph's, by far less than any score gap a ranking could see."""
    model = _model(2, dt=384, dg=1280, dr=320, hidden=768, dtype=torch.float32)
    with torch.no_grad():  # trained-like scales: small weights, LayerNorm near identity
        for p in model.drin.parameters():
            if p.dim() == 2:
                p.normal_(std=p.shape[1] ** -0.5)
    groups = torch.randint(0, 6, (2, 40), generator=torch.Generator().manual_seed(0))
    m, e = _parts(2, 40, 384, 1280, 320, seed=9, groups=groups, dtype=torch.float32)
    ref = model(m, e, final_edges=False)
    scores, _ = DrinKernel(model)(m, e, None, groups)
    assert (scores - ref.scores).abs().max() < 1e-5
    assert torch.equal(scores.argsort(dim=1), ref.scores.argsort(dim=1))


def test_a_graph_without_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="0-layer"):
        DrinKernel(_model(0))


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_image_groups_with_a_mask_and_an_empty_list(layers: int) -> None:
    model = _model(layers)
    groups = torch.tensor([[0, 1, 1, 2], [2, 0, 0, 1], [1, 1, 0, 2]])
    m, e = _parts(3, 4, seed=layers + 10, groups=groups)
    # mention 1 has no valid candidate at all; masked rows share groups with valid ones
    mask = torch.tensor([[True, False, True, True], [False] * 4, [True, True, False, False]])
    ref = model(m, e, mask, final_edges=False)
    scores, edges = DrinKernel(model)(m, e, mask, groups)
    assert torch.equal(torch.isinf(scores), ~mask)
    torch.testing.assert_close(scores[mask], ref.scores[mask], atol=1e-12, rtol=0)
    torch.testing.assert_close(edges, ref.edges_initial, atol=1e-12, rtol=0)


def test_native_alignment_one_candidate_and_no_candidates() -> None:
    torch.manual_seed(3)
    cfg = DrinRerankerConfig(DrinConfig(6, 6, hidden=8), "clip", 4, "native")
    model = DrinReranker(cfg).double().eval()
    kernel = DrinKernel(model)
    m, e = _parts(2, 1, dt=6, dg=6, seed=4)
    torch.testing.assert_close(
        kernel(m, e)[0], model(m, e, final_edges=False).scores, atol=1e-12, rtol=0
    )
    scores, edges = kernel(m, e.map(lambda t: t[:, :0]))
    assert scores.shape == (2, 0) and edges.shape == (2, 0, 4)


def test_changed_weights_are_folded_again() -> None:
    model = _model(2)
    kernel = DrinKernel(model)
    m, e = _parts(2, 5, seed=6)
    before = kernel(m, e)[0]
    with torch.no_grad():
        model.drin.entity_text_proj.weight.mul_(2.0)
        model.drin.layers[0].w_v.bias.add_(0.5)
    ref = model(m, e, final_edges=False).scores
    after = kernel(m, e)[0]
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, ref, atol=1e-12, rtol=0)


def test_misshapen_image_groups_are_refused() -> None:
    model = _model(2)
    m, e = _parts(3, 3, seed=7)
    with pytest.raises(ValueError, match="image_groups"):
        DrinKernel(model)(m, e, None, torch.zeros(3, 2, dtype=torch.long))


def test_the_servers_drin_reranker_scores_as_the_graph(artifacts, tmp_path) -> None:
    """DrinGraphReranker over a real store (image records shared by the imageless entities,
    a padded list) against DrinReranker on the same stored parts; with the torch kernel and
    with the onnxruntime one."""
    from types import SimpleNamespace

    import numpy as np

    from index.search import Candidates, IndexSearcher
    from models.model import LinkingModel
    from models.onnx_drin_kernel import OnnxDrinKernel, load_drin_kernel
    from service.rerankers import DrinGraphReranker

    model = LinkingModel.from_pretrained(artifacts[0])
    torch.manual_seed(2)
    drin = DrinReranker(DrinRerankerConfig.for_backbone(model.encoder.backbone, hidden=16))
    drin.eval()
    searcher = IndexSearcher(artifacts[1], model.fingerprint())
    try:
        n = len(searcher)
        rows = np.stack([np.random.default_rng(b).permutation(n) for b in range(3)])
        rows[2, -3:] = -1  # a shorter list, padded
        image_rows = searcher.image_rows(rows)
        assert image_rows is not None and (image_rows == 0).sum() > 3  # shared no-image record
        cfg = drin.config
        m, _ = _parts(
            3, 1, cfg.drin.text_dim, cfg.drin.image_dim, cfg.region_dim, seed=8, dtype=torch.float32
        )
        cand = Candidates.dense(rows, np.zeros(rows.shape, dtype=np.float32))
        batch = SimpleNamespace(encoded=SimpleNamespace(drin=m))
        mask = torch.from_numpy(rows >= 0)
        with torch.inference_mode():
            ref = drin(m, searcher.drin_parts(rows), mask, final_edges=False).scores.numpy()
        valid = rows >= 0
        # with the folded entity table (the tiny KB fits), and without one (budget 0)
        onnx = load_drin_kernel(drin, "onnx", tmp_path, 1)
        assert isinstance(onnx, OnnxDrinKernel)
        for table_mb, has_table in ((64.0, True), (0.0, False)):
            for kernel in (None, onnx):
                reranker = DrinGraphReranker(drin, searcher, table_mb, kernel)
                assert (reranker.table is not None) == has_table
                out = reranker.rerank(batch, cand)  # type: ignore[arg-type]
                assert np.isinf(out.scores[~valid]).all()
                np.testing.assert_allclose(out.scores[valid], ref[valid], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="another DRIN model"):
            DrinGraphReranker(_model(1, dtype=torch.float32), searcher, 0.0, onnx)
    finally:
        searcher.close()


def _kb(n: int = 12, images: int = 5, dt: int = 6, dg: int = 5, dr: int = 4, seed: int = 0):
    """A small KB as the store holds it: per-row text parts, per-image-record image parts
    (record 0: no image), each row's record."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, dt, generator=g, dtype=torch.float64)
    image = torch.randn(images, dg, generator=g, dtype=torch.float64)
    region = F.normalize(torch.randn(images, dr, generator=g, dtype=torch.float64), dim=-1)
    score = torch.rand(images, 1, generator=g, dtype=torch.float64)
    score[0] = 0.0
    record = torch.randint(0, images, (n,), generator=g)
    return text, image, region, score, record


def _candidates(kb, rows: torch.Tensor) -> tuple[DrinEntityParts, torch.Tensor]:
    text, image, region, score, record = kb
    r = rows.clamp_min(0)
    groups = record[r]
    return DrinEntityParts(text[r], image[groups], region[groups], score[groups]), groups


@pytest.mark.parametrize("layers", [1, 2])
def test_the_folded_entity_table_gives_the_graphs_scores(layers: int) -> None:
    model = _model(layers)
    kernel = DrinKernel(model)
    kb = _kb()
    text, image = kb[0], kb[1]
    # folded in chunks of any size, as the server reads the store
    table = kernel.entity_table(text.split(5), image.split(2))
    assert table.text.shape == (12, 8) and table.image.shape == (5, 8)
    assert table.aligned.shape == (5, 6)
    rows = torch.tensor([[3, 0, 11, 7], [5, 5, 2, -1]])  # a padded list
    mask = rows >= 0
    e, groups = _candidates(kb, rows)
    m, _ = _parts(2, 1, seed=12)
    ref = model(m, e, mask, final_edges=False)
    scores, edges = kernel(m, e, mask, groups, rows, table)
    torch.testing.assert_close(scores[mask], ref.scores[mask], atol=1e-12, rtol=0)
    assert torch.equal(torch.isinf(scores), ~mask)
    torch.testing.assert_close(edges, ref.edges_initial, atol=1e-12, rtol=0)


def test_the_table_is_read_only_when_it_covers_the_rows_and_the_weights() -> None:
    model = _model(2)
    kernel = DrinKernel(model)
    kb = _kb()
    table = kernel.entity_table([kb[0]], [kb[1]])
    rows = torch.tensor([[1, 2, 3]])
    e, groups = _candidates(kb, rows)
    m, _ = _parts(1, 1, seed=13)
    assert kernel._from_table(table, rows, groups) is not None
    # a row the table does not hold (added live since): folded per request instead
    short = EntityTable(table.text[:2], table.image, table.aligned, table.stamp)
    assert kernel._from_table(short, rows, groups) is None
    torch.testing.assert_close(
        kernel(m, e, None, groups, rows, short)[0],
        model(m, e, final_edges=False).scores,
        atol=1e-12,
        rtol=0,
    )
    # weights changed since the table was folded: it is stale and not read
    with torch.no_grad():
        model.drin.entity_image_proj.weight.mul_(-1.0)
    scores = kernel(m, e, None, groups, rows, table)[0]
    assert kernel._from_table(table, rows, groups) is None
    torch.testing.assert_close(scores, model(m, e, final_edges=False).scores, atol=1e-12, rtol=0)
    assert EntityTable.nbytes_for(1000, 10, 768, 384) == 4 * (1000 * 768 + 10 * 1152)
