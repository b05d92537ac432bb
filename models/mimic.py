"""MIMIC: Multi-Grained Multimodal Interaction Network for Entity Linking (KDD'23).

Luo et al., "Multi-Grained Multimodal Interaction Network for Entity Linking", KDD 2023.
Reproduces the computation of the authors' released code, github.com/pengfei-luo/MIMIC
(``codes/model/modeling_mimic.py`` at commit b194a434), which produced the paper's numbers and
the checkpoints people hold. Where the code and the paper differ, this file follows the code:

* the four input LayerNorms (``text_cls_layernorm`` ...) are applied to both sides first;
* no padding mask anywhere: all ``text_max_length`` token states take part;
* TGLU averages the attention output over the entity's query positions, then LayerNorms it;
* a DUAL block applies ONE ``cls_fc`` to both sides and gates with a scalar ``tanh(gate_fc)``;
* CMFU's ``context_layer_norm`` exists (so checkpoints load) but is unused;
* the released CMFU ``.squeeze()`` (which breaks for one entity or one mention) is not copied.

Score S = (S_T + S_V + S_C) / 3. Parameter names equal the released ``matcher.*`` names.

Shapes (d = unit width, 96 in the paper; dt = text width; dv = image feature width):
    mention features:  text_cls (B, dt), text_tokens (B, L, dt), image_cls (B, dv),
                       image_tokens (B, P, dv)
    entity features:   either shared by all mentions, (N, ...)      -> scores (B, N)
                       or one candidate list per mention, (B, K, ...) -> scores (B, K)

Everything on the entity side of every unit depends on the entity alone, so
:meth:`MimicMatcher.precompute_entities` turns entity features into a compact
:class:`MimicEntityRecord` once (offline, in the index job) and
:meth:`MimicMatcher.score_precomputed` scores mentions against those records only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UNITS = ("tglu", "vdlu", "cmfu")


@dataclass(frozen=True)
class MimicConfig:
    """Matcher dimensions. Defaults are the released WikiMEL config (``config/wikimel.yaml``)."""

    # Width of the text features: CLIP ViT-B/32 text hidden = projection = 512; MiniLM 384.
    dt: int = 512
    # Width of the image features after the encoder's image_cls_fc / image_tokens_fc.
    dv: int = 96
    # Unit widths; 96 in every released config.
    tglu_hidden_dim: int = 96
    idlu_hidden_dim: int = 96
    cmfu_hidden_dim: int = 96
    # Units that take part in the score (an ablation drops some; the paper's "w/o TGLU" etc.).
    units: tuple[str, ...] = UNITS

    def __post_init__(self) -> None:
        bad = [u for u in self.units if u not in UNITS]
        if bad or not self.units:
            raise ValueError(f"units must be a non-empty subset of {UNITS}, got {self.units}")
        # JSON gives lists back; keep the frozen config hashable.
        object.__setattr__(self, "units", tuple(self.units))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["units"] = list(self.units)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MimicConfig:
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        if "units" in kwargs:
            kwargs["units"] = tuple(kwargs["units"])
        return cls(**kwargs)


@dataclass(frozen=True)
class MimicFeatures:
    """Encoder output that MIMIC consumes, for B items (mentions) or N / (B, K) entities.

    text_cls:     (..., dt)     global text feature (CLIP: projected + L2-normalised)
    text_tokens:  (..., L, dt)  text token states, L = text_max_length, padding included
    image_cls:    (..., dv)     global image feature after image_cls_fc
    image_tokens: (..., P, dv)  local image features after image_tokens_fc
    """

    text_cls: Tensor
    text_tokens: Tensor
    image_cls: Tensor
    image_tokens: Tensor

    def map(self, fn: Any) -> MimicFeatures:
        return MimicFeatures(*(fn(getattr(self, f.name)) for f in fields(self)))

    def __len__(self) -> int:
        return int(self.text_cls.shape[0])


@dataclass(frozen=True)
class MimicScores:
    """score = (S_T + S_V + S_C) / 3 over the configured units; each (B, N) or (B, K)."""

    score: Tensor
    tglu: Tensor
    vdlu: Tensor
    cmfu: Tensor


@dataclass(frozen=True)
class MimicEntityRecord:
    """What MIMIC needs of an entity, computed once per entity (see precompute_entities).

    text_cls:   (..., dt)  text_cls_layernorm(e.text_cls)                  -> g2g
    tglu_cls:   (..., d)   tglu.fc_cls(LN(e.text_cls))                     -> g2l
    tglu_query: (..., L, d) tglu.fc_query(LN(e.text_tokens))              -> attention queries
    e2m_query:  (..., d)   vdlu.dual_ent2men.cls_fc(LN(e.image_cls))
    m2e_key:    (..., d)   vdlu.dual_men2ent.cls_fc(LN(e.image_cls))
    m2e_pooled: (..., d)   vdlu.dual_men2ent.tokens_fc(mean LN(e.image_tokens))
    cmfu:       (..., d)   the whole CMFU entity vector h_e
    """

    text_cls: Tensor
    tglu_cls: Tensor
    tglu_query: Tensor
    e2m_query: Tensor
    m2e_key: Tensor
    m2e_pooled: Tensor
    cmfu: Tensor

    def map(self, fn: Any) -> MimicEntityRecord:
        return MimicEntityRecord(*(fn(getattr(self, f.name)) for f in fields(self)))

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(MimicEntityRecord))


def _pairwise(mention: Tensor, entity: Tensor, shared: bool) -> tuple[Tensor, Tensor]:
    """Align a mention tensor (B, ...) with an entity tensor for broadcasting to (B, K, ...)."""
    m = mention.unsqueeze(1)  # (B, 1, ...)
    e = entity.unsqueeze(0) if shared else entity  # (1, N, ...) or (B, K, ...)
    return m, e


class TextGlobalLocalUnit(nn.Module):
    """TGLU, the text-based global-local interaction unit (paper section 3.2.1).

    Entity tokens attend to mention tokens: H = softmax(Q K^T / sqrt(d)) V with
    Q = fc_query(e.tokens), K = fc_key(m.tokens), V = fc_value(m.tokens);
    ctx = layer_norm(mean over query positions of H); g2l = fc_cls(e.cls) . ctx;
    g2g = m.cls . e.cls; S_T = (g2l + g2g) / 2.
    """

    def __init__(self, config: MimicConfig) -> None:
        super().__init__()
        d, h = config.dt, config.tglu_hidden_dim
        self.hidden = h
        self.fc_query = nn.Linear(d, h)
        self.fc_key = nn.Linear(d, h)
        self.fc_value = nn.Linear(d, h)
        self.fc_cls = nn.Linear(d, h)
        self.layer_norm = nn.LayerNorm(h)

    def score(
        self,
        m_cls: Tensor,
        m_tokens: Tensor,
        e_text_cls: Tensor,
        e_cls_fc: Tensor,
        e_query: Tensor,
        shared: bool,
    ) -> Tensor:
        """Scores from the entity's precomputed (LN'd cls, fc_cls, fc_query) -> (B, K)."""
        key = self.fc_key(m_tokens)  # (B, L, h)
        value = self.fc_value(m_tokens)  # (B, L, h)
        q = e_query.unsqueeze(0) if shared else e_query  # (1|B, K, L, h)
        att = torch.matmul(q, key.unsqueeze(1).transpose(-1, -2)) / math.sqrt(self.hidden)
        probs = att.softmax(dim=-1)  # (B, K, L, L)
        # mean_i (P V)_i == (mean_i P_i) V: one (L x h) product per pair instead of (L x L x h).
        ctx = torch.matmul(probs.mean(dim=-2), value)  # (B, K, L) @ (B, L, h) -> (B, K, h)
        ctx = self.layer_norm(ctx)
        e_fc = e_cls_fc.unsqueeze(0) if shared else e_cls_fc
        g2l = (e_fc * ctx).sum(-1)
        m, e = _pairwise(m_cls, e_text_cls, shared)
        g2g = (m * e).sum(-1)
        return (g2l + g2g) / 2


class DualBlock(nn.Module):
    """DUAL(a_cls, b_cls, b_tokens), one direction of VDLU (paper section 3.2.2).

    a = cls_fc(a_cls); b = cls_fc(b_cls) (one shared cls_fc); p = mean_tokens tokens_fc(b_tokens);
    c = fc(add_layer_norm(p + a)); g = tanh(gate_fc(c)) (a scalar gate);
    h = layer_norm(c * g + b); score = h . layer_norm(a).
    """

    def __init__(self, config: MimicConfig) -> None:
        super().__init__()
        d, h = config.dv, config.idlu_hidden_dim
        self.cls_fc = nn.Linear(d, h)
        self.tokens_fc = nn.Linear(d, h)
        self.fc = nn.Linear(h, h)
        self.gate_fc = nn.Linear(h, 1)
        self.add_layer_norm = nn.LayerNorm(h)
        self.layer_norm = nn.LayerNorm(h)

    def pooled(self, tokens: Tensor) -> Tensor:
        # tokens_fc is affine, so it commutes with the mean over tokens.
        return self.tokens_fc(tokens.mean(dim=-2))

    def combine(self, a: Tensor, b: Tensor, p: Tensor) -> Tensor:
        """a = cls_fc(a_cls), b = cls_fc(b_cls), p = pooled(b_tokens), broadcast to (B, K, h)."""
        c = self.fc(self.add_layer_norm(p + a))
        g = torch.tanh(self.gate_fc(c))
        h = self.layer_norm(c * g + b)
        return (h * self.layer_norm(a)).sum(-1)


class VisionDualUnit(nn.Module):
    """VDLU, the vision-based dual interaction unit: S_V = (DUAL_e2m + DUAL_m2e) / 2."""

    def __init__(self, config: MimicConfig) -> None:
        super().__init__()
        self.dual_ent2men = DualBlock(config)
        self.dual_men2ent = DualBlock(config)

    def score(
        self,
        m_image_cls: Tensor,
        m_image_tokens: Tensor,
        e_e2m_query: Tensor,
        e_m2e_key: Tensor,
        e_m2e_pooled: Tensor,
        shared: bool,
    ) -> Tensor:
        e2m, m2e = self.dual_ent2men, self.dual_men2ent
        # entity -> mention: a = entity, b = mention
        m_b, e_a = _pairwise(e2m.cls_fc(m_image_cls), e_e2m_query, shared)
        m_p = e2m.pooled(m_image_tokens).unsqueeze(1)
        s_e2m = e2m.combine(e_a, m_b, m_p)
        # mention -> entity: a = mention, b = entity
        m_a, e_b = _pairwise(m2e.cls_fc(m_image_cls), e_m2e_key, shared)
        e_p = e_m2e_pooled.unsqueeze(0) if shared else e_m2e_pooled
        s_m2e = m2e.combine(m_a, e_b, e_p)
        return (s_e2m + s_m2e) / 2


class CrossModalFusionUnit(nn.Module):
    """CMFU, the cross-modal fusion unit (paper section 3.2.3).

    For each side: t = text_fc(text_cls); P = image_fc(image_tokens);
    alpha = softmax_i(t . P_i); ctx = sum_i alpha_i P_i;
    h = gate_layer_norm(t * tanh(gate_fc(t)) + ctx); S_C = h_m . h_e.
    """

    def __init__(self, config: MimicConfig) -> None:
        super().__init__()
        d = config.cmfu_hidden_dim
        self.text_fc = nn.Linear(config.dt, d)
        self.image_fc = nn.Linear(config.dv, d)
        self.gate_fc = nn.Linear(d, 1)
        self.gate_layer_norm = nn.LayerNorm(d)
        # Present in released checkpoints, unused by their forward pass (kept so they load).
        self.context_layer_norm = nn.LayerNorm(d)

    def fuse(self, text_cls: Tensor, image_tokens: Tensor) -> Tensor:
        """(..., dt), (..., P, dv) -> (..., d): one side's fused vector h."""
        t = self.text_fc(text_cls)
        p = self.image_fc(image_tokens)
        alpha = torch.matmul(p, t.unsqueeze(-1)).squeeze(-1).softmax(dim=-1)  # (..., P)
        ctx = torch.matmul(alpha.unsqueeze(-2), p).squeeze(-2)  # (..., d)
        return self.gate_layer_norm(t * torch.tanh(self.gate_fc(t)) + ctx)


class MimicMatcher(nn.Module):
    """The MIMIC matcher (released name ``MIMICMatcher``): LayerNorms + TGLU + VDLU + CMFU."""

    def __init__(self, config: MimicConfig) -> None:
        super().__init__()
        self.config = config
        self.tglu = TextGlobalLocalUnit(config)
        self.vdlu = VisionDualUnit(config)
        self.cmfu = CrossModalFusionUnit(config)
        self.text_cls_layernorm = nn.LayerNorm(config.dt)
        self.text_tokens_layernorm = nn.LayerNorm(config.dt)
        self.image_cls_layernorm = nn.LayerNorm(config.dv)
        self.image_tokens_layernorm = nn.LayerNorm(config.dv)

    # ------------------------------------------------------------------ shared pieces
    def _normalise(self, f: MimicFeatures) -> MimicFeatures:
        return MimicFeatures(
            self.text_cls_layernorm(f.text_cls),
            self.text_tokens_layernorm(f.text_tokens),
            self.image_cls_layernorm(f.image_cls),
            self.image_tokens_layernorm(f.image_tokens),
        )

    def _combine(
        self, s_t: Tensor, s_v: Tensor, s_c: Tensor, units: tuple[str, ...] | None
    ) -> MimicScores:
        units = tuple(units) if units is not None else self.config.units
        parts = {"tglu": s_t, "vdlu": s_v, "cmfu": s_c}
        score = sum(parts[u] for u in units) / len(units)
        assert isinstance(score, Tensor)
        return MimicScores(score=score, tglu=s_t, vdlu=s_v, cmfu=s_c)

    @staticmethod
    def _is_shared(mention: MimicFeatures | Tensor, entity_cls: Tensor) -> bool:
        m_cls = mention.text_cls if isinstance(mention, MimicFeatures) else mention
        if entity_cls.dim() == m_cls.dim():
            return True  # (N, dt): one candidate set for every mention
        if entity_cls.dim() == m_cls.dim() + 1 and entity_cls.shape[0] == m_cls.shape[0]:
            return False  # (B, K, dt): one candidate list per mention
        raise ValueError(
            f"entity features {tuple(entity_cls.shape)} fit neither (N, dt) nor "
            f"(B={m_cls.shape[0]}, K, dt)"
        )

    # ------------------------------------------------------------------ public API
    def precompute_entities(self, entities: MimicFeatures) -> MimicEntityRecord:
        """Everything that depends on the entity alone; leading dims are kept ((N,) or (B, K))."""
        e = self._normalise(entities)
        e2m, m2e = self.vdlu.dual_ent2men, self.vdlu.dual_men2ent
        return MimicEntityRecord(
            text_cls=e.text_cls,
            tglu_cls=self.tglu.fc_cls(e.text_cls),
            tglu_query=self.tglu.fc_query(e.text_tokens),
            e2m_query=e2m.cls_fc(e.image_cls),
            m2e_key=m2e.cls_fc(e.image_cls),
            m2e_pooled=m2e.pooled(e.image_tokens),
            cmfu=self.cmfu.fuse(e.text_cls, e.image_tokens),
        )

    def score_precomputed(
        self,
        mentions: MimicFeatures,
        entities: MimicEntityRecord,
        units: tuple[str, ...] | None = None,
    ) -> MimicScores:
        """Score B mentions against precomputed entity records: (N, ...) or (B, K, ...)."""
        shared = self._is_shared(mentions, entities.text_cls)
        m = self._normalise(mentions)
        dtype = m.text_cls.dtype
        entities = entities.map(lambda t: t.to(dtype))
        s_t = self.tglu.score(
            m.text_cls,
            m.text_tokens,
            entities.text_cls,
            entities.tglu_cls,
            entities.tglu_query,
            shared,
        )
        s_v = self.vdlu.score(
            m.image_cls,
            m.image_tokens,
            entities.e2m_query,
            entities.m2e_key,
            entities.m2e_pooled,
            shared,
        )
        h_m = self.cmfu.fuse(m.text_cls, m.image_tokens)
        h_m, h_e = _pairwise(h_m, entities.cmfu, shared)
        s_c = (h_m * h_e).sum(-1)
        return self._combine(s_t, s_v, s_c, units)

    def score(
        self, mentions: MimicFeatures, entities: MimicFeatures, units: tuple[str, ...] | None = None
    ) -> MimicScores:
        """Score B mentions against entity features: (N, ...) -> (B, N); (B, K, ...) -> (B, K)."""
        return self.score_precomputed(mentions, self.precompute_entities(entities), units)

    # ------------------------------------------------------------------ retrieval
    # Two terms of MIMIC's score are exact inner products of per-side vectors:
    #   g2g = LN(m.text_cls) . LN(e.text_cls)  (half of S_T)   and   S_C = h_m . h_e.
    # With q = [LN(m.text_cls) / 2 ; h_m] and k = [LN(e.text_cls) ; h_e], q . k = g2g/2 + S_C:
    # exactly the decomposable part of (number of units) x S. FAISS retrieves by q . k; the
    # reranker then adds the non-decomposable rest (TGLU's attention term, VDLU).
    def retrieval_dim(self) -> int:
        return self.config.dt + self.config.cmfu_hidden_dim

    def _retrieval_weights(self) -> tuple[float, float]:
        units = self.config.units
        return (0.5 if "tglu" in units else 0.0), (1.0 if "cmfu" in units else 0.0)

    def retrieval_keys(self, entities: MimicEntityRecord) -> Tensor:
        """(N, dt + d) entity retrieval vectors from precomputed records (index side)."""
        return self.retrieval_keys_of(entities.text_cls, entities.cmfu)

    def retrieval_keys_of(self, text_cls: Tensor, cmfu: Tensor) -> Tensor:
        """The same from the only two record fields it reads (``text_cls``, ``cmfu``)."""
        wt, wc = self._retrieval_weights()
        text = text_cls if wt else torch.zeros_like(text_cls)
        fused = cmfu if wc else torch.zeros_like(cmfu)
        if not wt and not wc:  # a VDLU-only model: fall back to the fused vector
            fused = cmfu
        return torch.cat([text, fused], dim=-1)

    def retrieval_queries(self, mentions: MimicFeatures) -> Tensor:
        """(B, dt + d) mention query vectors: q . k = g2g / 2 + S_C (for the model's units)."""
        m = self._normalise(mentions)
        wt, wc = self._retrieval_weights()
        if not wt and not wc:
            wc = 1.0
        h_m = self.cmfu.fuse(m.text_cls, m.image_tokens)
        return torch.cat([m.text_cls * wt, h_m * wc], dim=-1)

    def forward(self, mentions: MimicFeatures, entities: MimicFeatures) -> MimicScores:
        return self.score(mentions, entities)


def in_batch_loss(scores: MimicScores, units: tuple[str, ...] = UNITS) -> Tensor:
    """The released training loss: CE(S) + sum over units of CE(S_unit), labels = arange(B).

    ``scores`` are mention x in-batch-entity matrices (B, B) whose diagonal is the gold pair.
    An ablated model (fewer units) drops those units' terms, as the paper's "w/o X + L_X".
    """
    labels = torch.arange(scores.score.shape[0], device=scores.score.device)
    loss = F.cross_entropy(scores.score, labels)
    for u in units:
        loss = loss + F.cross_entropy(getattr(scores, u), labels)
    return loss


__all__ = [
    "UNITS",
    "CrossModalFusionUnit",
    "DualBlock",
    "MimicConfig",
    "MimicEntityRecord",
    "MimicFeatures",
    "MimicMatcher",
    "MimicScores",
    "TextGlobalLocalUnit",
    "VisionDualUnit",
    "in_batch_loss",
]
