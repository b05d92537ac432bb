"""DRIN's vertex and edge inputs from the shared encoder, and the DRIN reranker checkpoint.

The released DRIN runs four large models per request (BERT-base, ResNet-152, Faster R-CNN,
CLIP). Here every input comes from the ONE backbone the service already runs for MIMIC
(MiniLM + EfficientNet-Lite0 by default, or CLIP), so DRIN adds no encoder pass:

=============  =====================================================================
role           feature (B = mentions, K = candidates)
=============  =====================================================================
m_t input      mean of the backbone's token states over the mention's span in the
               templated text ``mention [SEP] sentence`` (:func:`span_token_mask`), mapped
               into the pooled-text space (MiniLM: identity; CLIP: ``text_projection``)
m_i input      the mention image's pooled feature (EffNet average pool / CLIP image_embeds);
               a mention without image gets the "no image" features (zero pixels), as MIMIC
e_t^j input    the entity's pooled text feature of ``name [SEP] attributes`` (MiniLM sentence
               embedding / CLIP text_embeds)
e_i^j input    the entity's first image's pooled feature (or the "no image" features)
tt weight      cos(m_t input, e_t input): same space, as the released span-mean vs entity text
ti weight      cos(mention text, entity image) in a shared text-image space: the mention's
               pooled text vs ``align(entity image)``
it weight      cos(``align(mention image)``, entity pooled text)
ii weight      sum_ij s_i s_j cos(r_i, r_j) / (sum_ij s_i s_j + 1e-9) over the top-3 mention
               regions i and the top-1 entity region j (the released formula)
=============  =====================================================================

Shared space (``align``): CLIP is natively aligned (identity). For MiniLM + EfficientNet there
is none, so a linear map image -> text space is *learned* by ridge regression (closed form,
deterministic) on (image, text) pairs of the training data: every KB entity with an image
(its first image vs its pooled text) and every training mention with an image. With too few
pairs (< :data:`MIN_ALIGNMENT_PAIRS`) the map stays zero and ti / it are 0 for everyone.

Regions: the released code crops Faster R-CNN detections. Here a region is one local image
token (EffNet: a cell of the 7 x 7 final feature map; CLIP: a patch token, CLS excluded). Its
score, standing in for the detection confidence, is the token's activation norm divided by the
largest norm in that image (in (0, 1]; strongly activated cells are where the network sees
objects). The top-3 tokens of the mention image and the top-1 token of the entity image by
that score are the regions, unit-normalised for the cosines.

Missing images: any edge touching a missing image starts at 0 (ti and ii when the entity has
none, it and ii when the mention has none), as the released ii is 0 "when no region".

Entity-side parts depend on the backbone only, so the index job stores them per entity
(store fields ``drin_text``, ``drin_image``, ``drin_region``, ``drin_region_score``); a request
computes only the mention side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import PretrainedModule
from models.data.schema import find_span
from models.drin import DrinConfig, DrinInputs, DrinModel, DrinOutput
from models.encoders import Backbone, ClipBackbone, ImageFeatures, TextFeatures
from models.preprocess import MENTION_TEMPLATE, TextTokenizer

MENTION_REGIONS = 3  # the released top-3 mention regions
ENTITY_REGIONS = 1  # and top-1 entity region
MIN_ALIGNMENT_PAIRS = 16
EPS = 1e-9
DRIN_FORMAT = "mel-drin"
DRIN_VERSION = 1
STORE_FIELDS = ("drin_text", "drin_image", "drin_region", "drin_region_score")


# ---------------------------------------------------------------------- mention spans
def _span_prefix(mention: str) -> int:
    """Char offset where the sentence starts inside the templated mention text."""
    return len(MENTION_TEMPLATE.format(mention=mention, sentence=""))


def span_token_mask(
    tokenizer: TextTokenizer,
    mentions: Sequence[str],
    sentences: Sequence[str],
    spans: Sequence[tuple[int, int] | None],
) -> Tensor:
    """(B, L) bool: the token positions of each mention's span in ``mention [SEP] sentence``.

    Rule, in order: the given span; else the first case-insensitive occurrence of the mention
    in the sentence; if that is absent or truncated away (past ``max_length``), the leading
    copy of the mention at the start of the template. Tokenizers without offset mappings (slow
    ones) always take the leading copy.
    """
    tok = tokenizer.tokenizer
    L = tokenizer.max_length
    texts = [
        MENTION_TEMPLATE.format(mention=m, sentence=s)
        for m, s in zip(mentions, sentences, strict=True)
    ]
    out = torch.zeros(len(texts), L, dtype=torch.bool)
    if getattr(tok, "is_fast", False):
        enc = tok(
            texts,
            padding="max_length",
            max_length=L,
            truncation=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        for b, (m, s, sp) in enumerate(zip(mentions, sentences, spans, strict=True)):
            offsets = enc["offset_mapping"][b]
            special = enc["special_tokens_mask"][b]
            span = sp if sp is not None else find_span(m, s)
            ranges = []
            if span is not None:
                p = _span_prefix(m)
                ranges.append((p + span[0], p + span[1]))
            ranges.append((0, len(m)))  # the leading copy
            for lo, hi in ranges:
                hit = [
                    i
                    for i, (a, z) in enumerate(offsets)
                    if not special[i] and z > a and a < hi and z > lo
                ]
                if hit:
                    out[b, hit] = True
                    break
    else:
        for b, m in enumerate(mentions):
            n = len(tok.tokenize(m))
            out[b, 1 : 1 + max(1, min(n, L - 2))] = True  # after the BOS / CLS token
    empty = ~out.any(dim=1)
    out[empty, 1] = True  # an empty mention: the first real token
    return out


# ---------------------------------------------------------------------- parts
@dataclass(frozen=True)
class DrinMentionParts:
    """span_text (B, Dt), text (B, Dt), image (B, Dg), regions (B, 3, Dr) unit,
    region_scores (B, 3) (all 0 when the mention has no image)."""

    span_text: Tensor
    text: Tensor
    image: Tensor
    regions: Tensor
    region_scores: Tensor

    def map(self, fn: Any) -> DrinMentionParts:
        return DrinMentionParts(*(fn(getattr(self, f.name)) for f in fields(self)))

    def has_image(self) -> Tensor:
        return self.region_scores.sum(-1) > 0

    def __len__(self) -> int:
        return int(self.text.shape[0])


@dataclass(frozen=True)
class DrinEntityParts:
    """text (..., Dt), image (..., Dg), region (..., Dr) unit, region_score (..., 1) (0 = no
    image). Leading dims (N,) for a table, (B, K) for candidate lists."""

    text: Tensor
    image: Tensor
    region: Tensor
    region_score: Tensor

    def map(self, fn: Any) -> DrinEntityParts:
        return DrinEntityParts(*(fn(getattr(self, f.name)) for f in fields(self)))

    def has_image(self) -> Tensor:
        return self.region_score[..., 0] > 0

    def to_store(self) -> dict[str, Tensor]:
        return dict(
            zip(STORE_FIELDS, (self.text, self.image, self.region, self.region_score), strict=True)
        )

    @classmethod
    def from_store(cls, d: dict[str, Tensor]) -> DrinEntityParts:
        return cls(*(d[f] for f in STORE_FIELDS))


def top_regions(region_tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(B, R, D) -> unit regions (B, k', D) and scores (B, k') with k' = min(k, R): the tokens
    with the largest activation norm, scored by norm / max norm of the image."""
    norms = region_tokens.norm(dim=-1)
    scores = norms / norms.max(dim=-1, keepdim=True).values.clamp_min(EPS)
    top, idx = scores.topk(min(k, region_tokens.shape[1]), dim=-1)
    picked = region_tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, region_tokens.shape[-1]))
    return F.normalize(picked, dim=-1), top


def _span_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def mention_parts(
    backbone: Backbone,
    text: TextFeatures,
    image: ImageFeatures,
    span_mask: Tensor,
    has_image: Tensor,
) -> DrinMentionParts:
    """Mention-side DRIN inputs from raw backbone features (B mentions)."""
    span = backbone.pooled_text(_span_mean(text.tokens, span_mask.to(text.tokens.device)))
    regions, scores = top_regions(backbone.region_tokens(image.tokens), MENTION_REGIONS)
    scores = scores * has_image.to(scores.device).unsqueeze(-1).to(scores.dtype)
    return DrinMentionParts(span, text.global_, image.global_, regions, scores)


def entity_parts(
    backbone: Backbone, text: TextFeatures, image: ImageFeatures, has_image: Tensor
) -> DrinEntityParts:
    """Entity-side DRIN inputs from raw backbone features (N entities); what the store holds."""
    region, score = top_regions(backbone.region_tokens(image.tokens), ENTITY_REGIONS)
    score = score * has_image.to(score.device).unsqueeze(-1).to(score.dtype)
    return DrinEntityParts(text.global_, image.global_, region[:, 0], score)


# ---------------------------------------------------------------------- alignment
class CrossModalAlignment(nn.Module):
    """image feature -> text space. ``native`` (CLIP): identity; ``ridge``: a Linear fitted in
    closed form by :meth:`fit` (zero until fitted)."""

    pairs: Tensor  # how many (image, text) pairs the fit used (a buffer: saved with the weights)

    def __init__(self, kind: str, image_dim: int, text_dim: int) -> None:
        super().__init__()
        if kind not in ("native", "ridge"):
            raise ValueError(f"alignment must be native or ridge, got {kind!r}")
        if kind == "native" and image_dim != text_dim:
            raise ValueError(
                f"native alignment needs image_dim == text_dim ({image_dim, text_dim})"
            )
        self.kind = kind
        self.proj = nn.Linear(image_dim, text_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("pairs", torch.zeros((), dtype=torch.long))

    def forward(self, image: Tensor) -> Tensor:
        return image if self.kind == "native" else self.proj(image)

    @torch.no_grad()
    def fit(self, image: Tensor, text: Tensor, ridge: float = 1.0) -> int:
        """Least squares unit text ~ W image + b, L2 penalty on W of ``ridge`` x the mean
        feature variance x n (centred, float64). Returns the number of pairs used (0 = too
        few, the map stays zero)."""
        if self.kind == "native":
            return 0
        n = int(image.shape[0])
        self.pairs.fill_(n)
        if n < MIN_ALIGNMENT_PAIRS:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
            return 0
        x, y = image.double(), F.normalize(text.double(), dim=-1)
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        gram = xc.T @ xc
        # the penalty in units of the mean feature variance: scale-free across backbones
        lam = ridge * float(gram.diagonal().mean())
        gram = gram + lam * torch.eye(x.shape[1], dtype=x.dtype)
        w = torch.linalg.solve(gram, xc.T @ yc)  # (Dg, Dt)
        self.proj.weight.copy_(w.T.to(self.proj.weight.dtype))
        self.proj.bias.copy_((my - mx @ w).to(self.proj.bias.dtype))
        return n


# ---------------------------------------------------------------------- the reranker
@dataclass(frozen=True)
class DrinRerankerConfig:
    drin: DrinConfig
    backend: str  # the backbone family the parts come from
    region_dim: int
    alignment: str  # native | ridge

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["drin"] = self.drin.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DrinRerankerConfig:
        return cls(
            DrinConfig.from_dict(d["drin"]), d["backend"], int(d["region_dim"]), d["alignment"]
        )

    @classmethod
    def for_backbone(cls, backbone: Backbone, **drin: Any) -> DrinRerankerConfig:
        clip = isinstance(backbone, ClipBackbone)
        return cls(
            DrinConfig(text_dim=backbone.text_dim, image_dim=backbone.image_global_dim, **drin),
            "clip" if clip else "minilm-effnet",
            backbone.image_token_dim,
            "native" if clip else "ridge",
        )


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8)


class DrinReranker(PretrainedModule):
    """Initial edges from DRIN parts + the DRIN graph (models/drin.py). Its checkpoint
    (models/checkpoint.py) stores the whole state, the fitted alignment included."""

    checkpoint_format = DRIN_FORMAT
    checkpoint_version = DRIN_VERSION
    checkpoint_kind = "DRIN"
    config_class = DrinRerankerConfig

    def __init__(self, config: DrinRerankerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.drin
        self.drin = DrinModel(d)
        self.align = CrossModalAlignment(config.alignment, d.image_dim, d.text_dim)

    def initial_edges(
        self, m: DrinMentionParts, e: DrinEntityParts, aligned_image: Tensor | None = None
    ) -> Tensor:
        """(B, K, 4) initial (tt, ti, it, ii) weights of B mentions x their K candidates.
        ``aligned_image``: ``align(e.image)`` when the caller has it (the serving kernel
        aligns each distinct image once)."""
        m_img, e_img = m.has_image().unsqueeze(1), e.has_image()  # (B, 1), (B, K)
        tt = _cos(m.span_text.unsqueeze(1), e.text)
        if aligned_image is None:
            aligned_image = self.align(e.image)
        ti = _cos(m.text.unsqueeze(1), aligned_image) * e_img
        it = _cos(self.align(m.image).unsqueeze(1), e.text) * m_img
        # ii: sum_ij s_i s_j cos(r_i, r_j) / (sum_ij s_i s_j + eps), regions already unit
        cos_r = torch.einsum("bid,bkd->bik", m.regions, e.region)  # (B, R, K)
        w = m.region_scores.unsqueeze(-1) * e.region_score[..., 0].unsqueeze(1)  # (B, R, K)
        ii = (w * cos_r).sum(1) / (w.sum(1) + EPS)
        return torch.stack([tt, ti, it, ii], dim=-1)

    def inputs(self, m: DrinMentionParts, e: DrinEntityParts) -> DrinInputs:
        return DrinInputs(m.span_text, m.image, e.text, e.image, self.initial_edges(m, e))

    def forward(
        self,
        m: DrinMentionParts,
        e: DrinEntityParts,
        candidate_mask: Tensor | None = None,
        final_edges: bool = True,
    ) -> DrinOutput:
        dtype = self.align.proj.weight.dtype
        m = m.map(lambda t: t.to(dtype))
        e = e.map(lambda t: t.to(dtype))
        return self.drin(self.inputs(m, e), candidate_mask, final_edges)

    # ------------------------------------------------------------------ checkpoint
    @classmethod
    def from_config(cls, config: DrinRerankerConfig, folder: Path) -> DrinReranker:
        return cls(config)


def check_compatible(drin: DrinReranker, model: Any) -> None:
    """A DRIN checkpoint reads the backbone's raw features: refuse another backbone."""
    want = drin.meta.get("backbone_weights")
    have = model.encoder.backbone.weights_fingerprint()
    if want is not None and want != have:
        raise ValueError(
            f"DRIN checkpoint was trained on backbone {want}, this model's backbone is {have}"
        )
    cfg = drin.config.drin
    bb = model.encoder.backbone
    if (cfg.text_dim, cfg.image_dim) != (bb.text_dim, bb.image_global_dim):
        raise ValueError(
            f"DRIN expects text/image widths {(cfg.text_dim, cfg.image_dim)}, the backbone "
            f"gives {(bb.text_dim, bb.image_global_dim)}"
        )


__all__ = [
    "ENTITY_REGIONS",
    "MENTION_REGIONS",
    "STORE_FIELDS",
    "CrossModalAlignment",
    "DrinEntityParts",
    "DrinMentionParts",
    "DrinReranker",
    "DrinRerankerConfig",
    "check_compatible",
    "entity_parts",
    "mention_parts",
    "span_token_mask",
    "top_regions",
]
