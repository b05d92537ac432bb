"""The DRIN serving kernel: the graph's scores with the first layer's entity products folded.

The server scores B mentions x K candidates with DRIN (``models/drin.py``, the released graph)
over entity parts read from the store. Of the graph's per-candidate matrix products, most sit
in the first layer and touch nothing but the entity: the input projections ``e_t = P_t x +
b_t`` and ``e_i = P_i y + b_i``, then ``W_h e_t``, ``W_h e_i``, ``W_v e_t`` and ``W_v e_i``.
Every one of them is linear, so they compose:

* ``W_h e_t = (W_h P_t) x + W_h b_t``: one (d x Dt) product per candidate instead of two;
  likewise ``W_h e_i = (W_h P_i) y + W_h b_i``, and ``e_t``, ``e_i`` themselves are never
  formed (the mention vertices aggregate them only through ``W_h``, and ``W_h`` of a weighted
  mean is the weighted mean of ``W_h``);
* an edge logit ``mean_d(u * (W_v e + b_v)) = ((W_v P)^T u) . x / d + u . (W_v b + b_v) / d``
  with ``u = W_u m + b_u``: one product per MENTION, then a dot product per candidate;
* image products run once per distinct image (``image_groups``, the store's image records:
  every imageless entity shares the no-image record), as does the alignment of the entity
  image for the ti edge.

What remains per candidate is ``(W_h P_t) x`` (Dt x d), the image products of the distinct
images, and the later layers' ``W_h`` (d x d) each: for MiniLM + EfficientNet (Dt 384, Dg
1280, d 768, 2 layers) 0.9 M multiply-adds per imageless candidate against 4.7 M in the
graph as written, and 2.4 M per candidate with an image of its own.

Those entity products depend on the entity and the DRIN weights alone, so the server folds
the whole base KB once when the model loads (:meth:`DrinKernel.entity_table`, when it fits
its memory budget) and a request only gathers them: per candidate, the last layer's
``W_h`` (0.6 M) is then the only matrix product. The per-candidate vector work is batched
too: ``W_h (x + a m_t + a' m_i) + b`` is ``W_h x`` plus one (K, 3) x (3, d) product per
mention (``baddbmm``), the means over candidates are (1, K) x (K, d) products, and the final
cosine is a dot product over the two norms (as ``F.cosine_similarity``: each clamped at 1e-8).
What is left is the last layer's GEMM and the exact GELU / LayerNorm of three (B, K, d)
vertex sets (tests/test_drin_kernel.py; bench/drin_bench.py times it).

The scores equal ``DrinReranker(..., final_edges=False)`` within float rounding
(tests/test_drin_kernel.py): the same computation with the products in another order. DRIN
itself is unchanged, and training and ``explain`` (which reads the last layer's edges) run the
graph as released. The composed matrices are taken from the weights when the kernel is built,
and composed again whenever a source weight has changed since (checked per call: a version
counter per tensor).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.drin import DynamicGcnLayer
from models.drin_features import DrinEntityParts, DrinMentionParts, DrinReranker

COS_EPS = 1e-8  # F.cosine_similarity's default eps


def _candidate_weights(edges: Tensor, mask: Tensor | None) -> Tensor:
    """(B, K) weights of a mean over candidates: 1 / K, or 1 / valid count on valid ones
    (``models.drin._mean_over_candidates``)."""
    B, K = edges.shape[:2]
    if mask is None:
        return torch.full((B, K), 1.0 / K, dtype=edges.dtype, device=edges.device)
    m = mask.to(edges.dtype)
    return m / m.sum(dim=1, keepdim=True).clamp_min(1.0)


def _distinct(y: Tensor, groups: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(B, K, D) -> the rows of the distinct groups (U, D) and each candidate's index into them
    (B, K); without groups every candidate is its own row (and None)."""
    if groups is None:
        return y.reshape(-1, y.shape[-1]), None
    flat = groups.reshape(-1)
    uniq, inverse = torch.unique(flat, return_inverse=True)
    # the first candidate of each group stands for it (equal groups hold equal images)
    first = torch.full((uniq.numel(),), flat.numel(), dtype=torch.long, device=flat.device)
    first.scatter_reduce_(0, inverse, torch.arange(flat.numel(), device=flat.device), "amin")
    return y.reshape(-1, y.shape[-1])[first], inverse.reshape(groups.shape)


def _spread(rows: Tensor, inverse: Tensor | None, shape: torch.Size) -> Tensor:
    """Rows of distinct groups back to every candidate: (U, D) -> (B, K, D)."""
    if inverse is None:
        return rows.reshape(*shape, rows.shape[-1])
    return rows[inverse]


@dataclass(frozen=True)
class EntityTable:
    """The first layer's entity products of a whole KB, folded once per DRIN model instead of
    per candidate per request: ``text`` (N, d) = W_h e_t of entity row n; ``image`` (I, d) =
    W_h e_i and ``aligned`` (I, Dt) = align(e_i) of image record i (the store's image table,
    record 0 the no-image one). ``stamp``: the weights it was folded from."""

    text: Tensor
    image: Tensor
    aligned: Tensor
    stamp: tuple[tuple[object, ...], ...]

    @staticmethod
    def nbytes_for(rows: int, images: int, hidden: int, text_dim: int, itemsize: int = 4) -> int:
        return itemsize * (rows * hidden + images * (hidden + text_dim))


class DrinKernel:
    """Scores of a :class:`DrinReranker` over per-mention candidate lists (inference only)."""

    runtime = "torch"

    def __init__(self, reranker: DrinReranker) -> None:
        self.reranker = reranker
        drin = reranker.drin
        layers = list(drin.layers)
        if not layers:
            raise ValueError("the DRIN kernel folds the first layer: a 0-layer graph has none")
        first = layers[0]
        assert isinstance(first, DynamicGcnLayer)
        self.first = first
        self.rest = layers[1:]
        self._sources = (
            first.w_h.weight,
            first.w_v.weight,
            first.w_v.bias,
            drin.entity_text_proj.weight,
            drin.entity_text_proj.bias,
            drin.entity_image_proj.weight,
            drin.entity_image_proj.bias,
        )
        self._stamp: tuple[tuple[object, ...], ...] = ()
        self._fold()

    def _source_stamp(self) -> tuple[tuple[object, ...], ...]:
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self._sources)

    def _fold(self) -> None:
        """Compose the first layer's entity products (float64, kept in the model's dtype).
        Redone when a source weight changed since (an in-place update, ``load_state_dict``,
        ``.to()``), so the kernel never scores with stale matrices."""
        drin, first = self.reranker.drin, self.first
        self.dtype = self.reranker.align.proj.weight.dtype
        d = first.w_u.out_features
        with torch.no_grad():

            def w(lin: torch.nn.Linear) -> tuple[Tensor, Tensor]:
                return lin.weight.detach().double(), lin.bias.detach().double()

            wh, _ = w(first.w_h)
            wv, bv = w(first.w_v)
            pt, bt = w(drin.entity_text_proj)
            pi, bi = w(drin.entity_image_proj)
            self.h_text = (wh @ pt).to(self.dtype)  # (d, Dt): W_h P_t
            self.h_text_bias = (wh @ bt).to(self.dtype)
            self.h_image = (wh @ pi).to(self.dtype)  # (d, Dg): W_h P_i
            self.h_image_bias = (wh @ bi).to(self.dtype)
            # the edge logits' mean over the d dims folded in (no overflow of d x the mean)
            self.v_text = (wv @ pt / d).to(self.dtype)  # (d, Dt): W_v P_t / d
            self.v_text_bias = ((wv @ bt + bv) / d).to(self.dtype)
            self.v_image = (wv @ pi / d).to(self.dtype)  # (d, Dg): W_v P_i / d
            self.v_image_bias = ((wv @ bi + bv) / d).to(self.dtype)
        self._stamp = self._source_stamp()

    @torch.inference_mode()
    def entity_table(self, texts: Iterable[Tensor], images: Iterable[Tensor]) -> EntityTable:
        """Fold a whole KB: ``texts`` yields the entity rows' raw text parts in row order,
        ``images`` the image records' raw image features in record order (chunks of any
        size)."""
        if self._source_stamp() != self._stamp:
            self._fold()
        align = self.reranker.align
        text = [F.linear(t.to(self.dtype), self.h_text, self.h_text_bias) for t in texts]
        image, aligned = [], []
        for y in images:
            y = y.to(self.dtype)
            image.append(F.linear(y, self.h_image, self.h_image_bias))
            aligned.append(align(y))
        return EntityTable(torch.cat(text), torch.cat(image), torch.cat(aligned), self._stamp)

    def _from_table(
        self, table: EntityTable | None, rows: Tensor | None, groups: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """(W_h e_t, W_h e_i, align(e_i)) per candidate from ``table`` when it covers every
        row and image record and was folded from the current weights; else None."""
        if table is None or rows is None or groups is None or table.stamp != self._stamp:
            return None
        r = rows.clamp_min(0)  # padding reads row 0, as the store does
        if int(r.max()) >= table.text.shape[0] or int(groups.max()) >= table.image.shape[0]:
            return None  # a live row, or a table of another store
        return table.text[r], table.image[groups], table.aligned[groups]

    @torch.inference_mode()
    def __call__(
        self,
        m: DrinMentionParts,
        e: DrinEntityParts,
        candidate_mask: Tensor | None = None,
        image_groups: Tensor | None = None,
        rows: Tensor | None = None,
        table: EntityTable | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Scores (B, K) (-inf where ``candidate_mask`` is False) and the initial edges
        (B, K, 4). ``image_groups`` (B, K) int: candidates with equal values have equal image
        parts (the store's image record of each row); None computes every candidate's.
        ``table`` (with ``rows``, the candidates' KB rows, and ``image_groups`` = their image
        records): the first layer's entity products read from it instead of folded here."""
        if self._source_stamp() != self._stamp:
            self._fold()
        m = m.map(lambda t: t.to(self.dtype))
        e = e.map(lambda t: t.to(self.dtype))
        shape = e.text.shape[:2]
        if image_groups is not None and tuple(image_groups.shape) != tuple(shape):
            raise ValueError(f"image_groups {tuple(image_groups.shape)} != (B, K) {tuple(shape)}")
        if shape[1] == 0:  # no candidates: nothing to score
            empty = e.text.new_zeros(shape)
            return empty, e.text.new_zeros(*shape, 4)
        if image_groups is not None:
            image_groups = image_groups.to(e.image.device)
        h_et, h_ei, aligned = self.entity_products(e, image_groups, rows, table)
        return self.scores(m, e, h_et, h_ei, aligned, candidate_mask)

    def entity_products(
        self,
        e: DrinEntityParts,
        image_groups: Tensor | None = None,
        rows: Tensor | None = None,
        table: EntityTable | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The first layer's entity products per candidate, (B, K, d) W_h e_t and W_h e_i and
        (B, K, Dt) align(e_i): gathered from ``table`` when it covers the candidates, else
        folded here (each distinct image once). ``e`` in the kernel's dtype."""
        folded = self._from_table(table, rows, image_groups)
        if folded is not None:
            return folded
        shape = e.text.shape[:2]
        y_rows, inverse = _distinct(e.image, image_groups)
        aligned = _spread(self.reranker.align(y_rows), inverse, shape)
        h_et = F.linear(e.text, self.h_text, self.h_text_bias)  # (B, K, d) = W_h e_t
        h_ei = _spread(F.linear(y_rows, self.h_image, self.h_image_bias), inverse, shape)
        return h_et, h_ei, aligned

    def scores(
        self,
        m: DrinMentionParts,
        e: DrinEntityParts,
        h_et: Tensor,
        h_ei: Tensor,
        aligned: Tensor,
        candidate_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`__call__` from the first layer's entity products on: the scores (B, K) and
        the initial edges (B, K, 4). Everything in the kernel's dtype, K > 0."""
        drin, first = self.reranker.drin, self.first
        edges = self.reranker.initial_edges(m, e, aligned_image=aligned)

        mt = drin.mention_text_proj(m.span_text)  # (B, d)
        mi = drin.mention_image_proj(m.image)
        hmt = F.linear(mt, first.w_h.weight)  # W_h without its bias
        hmi = F.linear(mi, first.w_h.weight)

        w = _candidate_weights(edges, candidate_mask)
        ones = torch.ones_like(edges[..., 0])
        a_tt, a_ti, a_it, a_ii = edges.unbind(-1)

        def vertex(layer: DynamicGcnLayer, pre: Tensor) -> Tensor:  # _vertex after its W_h
            return F.gelu(layer.layer_norm(pre))

        def pooled(a: Tensor, x: Tensor) -> Tensor:  # sum_k w_k a_k x_k: (B, K, d) -> (B, d)
            return torch.bmm((w * a).unsqueeze(1), x).squeeze(1)

        def per_candidate(
            layer: DynamicGcnLayer, hx: Tensor, a1: Tensor, a2: Tensor, hm1: Tensor, hm2: Tensor
        ) -> Tensor:
            """W_h (x + a1 m_t + a2 m_i) + b for every candidate from hx = W_h x and the
            mentions' W_h m: one batched product, (B, K, 3) x (B, 3, d), added to hx."""
            coef = torch.stack([a1, a2, ones], dim=-1)
            rows = torch.stack([hm1, hm2, layer.w_h.bias.expand_as(hm1)], dim=1)
            return torch.baddbmm(hx, coef, rows)

        new_mt = vertex(first, hmt + first.w_h.bias + pooled(a_tt, h_et) + pooled(a_ti, h_ei))
        new_et = vertex(first, per_candidate(first, h_et, a_tt, a_it, hmt, hmi))
        if self.rest:
            new_mi = vertex(first, hmi + first.w_h.bias + pooled(a_it, h_et) + pooled(a_ii, h_ei))
            new_ei = vertex(first, per_candidate(first, h_ei, a_ti, a_ii, hmt, hmi))
            edges1 = torch.sigmoid(edges + self._edge_logits(mt, mi, e))
            state = (new_mt, new_mi, new_et, new_ei, edges1)
            for layer in self.rest[:-1]:  # layers between the first and the last, as released
                state = layer(*state, candidate_mask)
            mt1, mi1, et1, ei1, ed = state
            last = self.rest[-1]
            assert isinstance(last, DynamicGcnLayer)
            # the last layer's text vertices (DynamicGcnLayer.text_vertices), W_h distributed
            b_tt, b_ti, b_it = ed[..., 0], ed[..., 1], ed[..., 2]
            wh = last.w_h.weight
            new_mt = vertex(last, last.w_h(mt1 + pooled(b_tt, et1) + pooled(b_ti, ei1)))
            new_et = vertex(
                last,
                per_candidate(
                    last, F.linear(et1, wh), b_tt, b_it, F.linear(mt1, wh), F.linear(mi1, wh)
                ),
            )
        # cos(m_t, e_t) as F.cosine_similarity: each side over its norm clamped at 1e-8
        dots = torch.bmm(new_et, new_mt.unsqueeze(-1)).squeeze(-1)
        norm_e = new_et.norm(dim=-1).clamp_min(COS_EPS)
        norm_m = new_mt.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
        scores = dots / (norm_e * norm_m)
        if candidate_mask is not None:
            scores = scores.masked_fill(~candidate_mask, float("-inf"))
        return scores, edges

    def _edge_logits(
        self,
        mt: Tensor,
        mi: Tensor,
        e: DrinEntityParts,
    ) -> Tensor:
        """(B, K, 4) ``mean_d((W_u u + b_u) * (W_v v + b_v))`` for the (tt, ti, it, ii) ends,
        from the raw entity features: a product per mention, a dot product per candidate."""
        first = self.first
        u = F.linear(torch.stack([mt, mi], dim=1), first.w_u.weight, first.w_u.bias)  # (B,2,d)
        q_text = u @ self.v_text  # (B, 2, Dt)
        q_image = u @ self.v_image  # (B, 2, Dg)
        c_text = u @ self.v_text_bias  # (B, 2)
        c_image = u @ self.v_image_bias
        # (B, K, Dt) x (B, Dt, 2) -> (B, K, 2); as batched products, not einsum (onnxruntime's
        # Einsum ran these 2-3x slower than its MatMul)
        text = torch.matmul(e.text, q_text.transpose(1, 2)) + c_text.unsqueeze(1)
        # per candidate even with image groups: B K Dg multiply-adds, while the distinct
        # images against every mention's query would be U B Dg
        image = torch.matmul(e.image, q_image.transpose(1, 2)) + c_image.unsqueeze(1)
        # (tt, ti, it, ii) = (m_t-e_t, m_t-e_i, m_i-e_t, m_i-e_i)
        return torch.stack([text[..., 0], image[..., 0], text[..., 1], image[..., 1]], -1)


__all__ = ["DrinKernel", "EntityTable"]
