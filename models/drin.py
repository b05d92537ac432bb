"""DRIN: Dynamic Relation Interactive Network for multimodal entity linking (ACM MM'23).

Xing et al., "DRIN: Dynamic Relation Interactive Network for Multimodal Entity Linking",
ACM MM 2023. Reproduces the graph computation of the authors' released code,
github.com/starreeze/drin ``drin/model.py`` (commit be028a9a; identical to ``drgcn/model.py``
of 2023-03-23), as batched tensor operations over B mentions x K candidates (the released code
loops in Python over candidates and regions).

Graph per mention: vertices m_t, m_i (mention text / image) and e_t^j, e_i^j for each of the K
candidates, all of width d after a per-type Linear. Four scalar edges per candidate, in the
order (tt, ti, it, ii): m_t--e_t, m_t--e_i, m_i--e_t, m_i--e_i. Each of L layers (own weights;
W_h, LayerNorm shared by every vertex type, W_u / W_v by every edge type):

    m_t' = GELU(LN(W_h(m_t + mean_j a_tt^j e_t^j + mean_j a_ti^j e_i^j)))
    m_i' = GELU(LN(W_h(m_i + mean_j a_it^j e_t^j + mean_j a_ii^j e_i^j)))
    e_t' = GELU(LN(W_h(e_t + a_tt m_t + a_it m_i)))
    e_i' = GELU(LN(W_h(e_i + a_ti m_t + a_ii m_i)))
    a'   = sigmoid(a + mean_over_dims((W_u u) * (W_v v)))    (u, v: PRE-update ends)

score_j = cos(m_t^(L), e_t^{j,(L)}); the last layer's edges are returned for explanation only.
Loss: mean_b mean_j max(0, margin - s_gold + s_j) over ALL candidates (gold column included).

Differences an online service makes (see the README): candidates are the retrieved top-K (the
released code appends the gold entity to every list); an optional ``candidate_mask`` lets the
means run over fewer than K valid candidates (``None`` = the released plain mean).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EDGE_TYPES = ("tt", "ti", "it", "ii")


@dataclass(frozen=True)
class DrinConfig:
    """Dimensions and training constants (released defaults in ``common/args.py``)."""

    text_dim: int  # raw mention/entity text feature width (backbone text width)
    image_dim: int  # raw pooled image feature width
    hidden: int = 768  # d, the released gcn_embed_dim
    layers: int = 2  # the released num_gcn_layers
    margin: float = 0.25  # margin ranking loss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DrinConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class DrinInputs:
    """Raw per-request graph inputs.

    mention_text:  (B, Dt)     mean of token states over the mention span
    mention_image: (B, Di)     pooled mention image feature
    entity_text:   (B, K, Dt)  pooled entity text feature
    entity_image:  (B, K, Di)  pooled entity image feature
    edges:         (B, K, 4)   initial (tt, ti, it, ii) weights
    """

    mention_text: Tensor
    mention_image: Tensor
    entity_text: Tensor
    entity_image: Tensor
    edges: Tensor

    def map(self, fn: Any) -> DrinInputs:
        return DrinInputs(*(fn(getattr(self, f.name)) for f in fields(self)))


@dataclass(frozen=True)
class DrinOutput:
    """scores: (B, K) cosine of final text vertices; edges_initial / edges_final: (B, K, 4)
    (edges_final None when the caller asked for the scores alone)."""

    scores: Tensor
    edges_initial: Tensor
    edges_final: Tensor | None


def _mean_over_candidates(x: Tensor, mask: Tensor | None) -> Tensor:
    """(B, K, d) -> (B, d): mean over candidates (over valid ones when a mask is given)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class DynamicGcnLayer(nn.Module):
    """One DRIN layer: vertex update (residual before W_h; Linear -> LayerNorm -> exact GELU)
    and dynamic edge update from the pre-update vertices."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.w_h = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden)
        self.w_u = nn.Linear(hidden, hidden)
        self.w_v = nn.Linear(hidden, hidden)

    def _vertex(self, x: Tensor) -> Tensor:
        return F.gelu(self.layer_norm(self.w_h(x)))  # exact (erf) GELU, as released

    def text_vertices(
        self,
        mt: Tensor,
        mi: Tensor,
        et: Tensor,
        ei: Tensor,
        edges: Tensor,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The updated text vertices (m_t', e_t'): all the last layer gives the scores."""
        a_tt, a_ti, a_it = (edges[..., i].unsqueeze(-1) for i in range(3))
        new_mt = self._vertex(
            mt + _mean_over_candidates(a_tt * et, mask) + _mean_over_candidates(a_ti * ei, mask)
        )
        new_et = self._vertex(et + a_tt * mt.unsqueeze(1) + a_it * mi.unsqueeze(1))
        return new_mt, new_et

    def forward(
        self,
        mt: Tensor,
        mi: Tensor,
        et: Tensor,
        ei: Tensor,
        edges: Tensor,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        a_ti, a_it, a_ii = (edges[..., i].unsqueeze(-1) for i in range(1, 4))
        new_mt, new_et = self.text_vertices(mt, mi, et, ei, edges, mask)
        new_mi = self._vertex(
            mi + _mean_over_candidates(a_it * et, mask) + _mean_over_candidates(a_ii * ei, mask)
        )
        new_ei = self._vertex(ei + a_ti * mt.unsqueeze(1) + a_ii * mi.unsqueeze(1))
        # edges from the PRE-update vertices: (tt, ti, it, ii) = (mt-et, mt-ei, mi-et, mi-ei)
        fu_t, fu_i = self.w_u(mt).unsqueeze(1), self.w_u(mi).unsqueeze(1)  # (B, 1, d)
        fv_t, fv_i = self.w_v(et), self.w_v(ei)  # (B, K, d)
        inter = torch.stack(
            [
                (fu_t * fv_t).mean(-1),
                (fu_t * fv_i).mean(-1),
                (fu_i * fv_t).mean(-1),
                (fu_i * fv_i).mean(-1),
            ],
            dim=-1,
        )
        new_edges = torch.sigmoid(edges + inter)
        return new_mt, new_mi, new_et, new_ei, new_edges


class DrinModel(nn.Module):
    """Per-type input projections + L dynamic GCN layers + cosine scoring."""

    def __init__(self, config: DrinConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        self.mention_text_proj = nn.Linear(config.text_dim, d)
        self.mention_image_proj = nn.Linear(config.image_dim, d)
        self.entity_text_proj = nn.Linear(config.text_dim, d)
        self.entity_image_proj = nn.Linear(config.image_dim, d)
        self.layers = nn.ModuleList([DynamicGcnLayer(d) for _ in range(config.layers)])

    def forward(
        self, x: DrinInputs, candidate_mask: Tensor | None = None, final_edges: bool = True
    ) -> DrinOutput:
        """``final_edges=False``: the scores alone, the same values bit for bit. The last
        layer's image vertices and edges feed no score, so it updates only the text
        vertices (about 3/4 of its products skipped) and ``edges_final`` is None."""
        B, K = x.entity_text.shape[:2]
        if x.edges.shape != (B, K, 4):
            raise ValueError(f"edges {tuple(x.edges.shape)} != (B={B}, K={K}, 4)")
        mt = self.mention_text_proj(x.mention_text)
        mi = self.mention_image_proj(x.mention_image)
        et = self.entity_text_proj(x.entity_text)
        ei = self.entity_image_proj(x.entity_image)
        edges = x.edges
        layers = list(self.layers)
        full = layers if final_edges or not layers else layers[:-1]
        for layer in full:
            mt, mi, et, ei, edges = layer(mt, mi, et, ei, edges, candidate_mask)
        if len(full) < len(layers):
            last = layers[-1]
            assert isinstance(last, DynamicGcnLayer)
            mt, et = last.text_vertices(mt, mi, et, ei, edges, candidate_mask)
        scores = F.cosine_similarity(mt.unsqueeze(1).expand_as(et), et, dim=-1)
        if candidate_mask is not None:
            scores = scores.masked_fill(~candidate_mask, float("-inf"))
        return DrinOutput(
            scores=scores, edges_initial=x.edges, edges_final=edges if final_edges else None
        )


def margin_ranking_loss(scores: Tensor, gold: Tensor, margin: float = 0.25) -> Tensor:
    """mean_b mean_j max(0, margin - s_gold + s_j) over ALL K candidates (gold included, which
    contributes the constant ``margin``), as the released training loss."""
    s_gold = scores.gather(1, gold.unsqueeze(1))
    return torch.clamp(margin - s_gold + scores, min=0).mean()


__all__ = [
    "EDGE_TYPES",
    "DrinConfig",
    "DrinInputs",
    "DrinModel",
    "DrinOutput",
    "DynamicGcnLayer",
    "margin_ranking_loss",
]
