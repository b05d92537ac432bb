"""The serving kernel: MIMIC over per-mention candidate lists as large batched GEMMs.

The server reranks B mentions, each against its OWN K retrieved candidates, from the
entities' precomputed records (``MimicMatcher.precompute_entities``, stored by the index job).
``MimicMatcher.score_precomputed`` does this as the released code is written: one
(L, h) x (h, L) attention product per (mention, candidate) pair. :func:`score_candidates`
computes the same scores (equal within float rounding, tests/test_rerank_kernel.py) with one
attention GEMM per mention for all its candidates and a fused softmax-mean; MIMIC itself
(models/mimic.py) is unchanged. Inference only; imported by the service, so it imports no
training code.

Cost (L = 40 tokens, h = 96): almost all of it is the attention logits, 2 B K L^2 h FLOPs
(31 MFLOP at K = 100); bench/speed.py measures the kernel against a pure GEMM of those FLOPs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.mimic import (
    MimicEntityRecord,
    MimicFeatures,
    MimicMatcher,
    MimicScores,
    TextGlobalLocalUnit,
)

# Attention elements (B x k x L x L) materialised at once: 256k fp32 = 1 MB (bench/speed.py
# and its profiles: 64k-1M elements within noise of each other; 16k pays the per-block op
# overhead, 1 x 1000 in one block spills to memory).
CANDIDATE_BLOCK = 1 << 18


@torch.inference_mode()
def tglu_candidates(
    tglu: TextGlobalLocalUnit,
    m_cls: Tensor,
    m_tokens: Tensor,
    e_text_cls: Tensor,
    e_cls_fc: Tensor,
    e_query: Tensor,
    block_elements: int = CANDIDATE_BLOCK,
) -> Tensor:
    """TGLU scores (B, K) of B mentions, each against its own K candidates.

    Same computation as ``TextGlobalLocalUnit.score(..., shared=False)`` (inputs already
    LayerNorm'd: m_cls (B, dt), m_tokens (B, L, dt); records e_text_cls (B, K, dt),
    e_cls_fc (B, K, h), e_query (B, K, L, h)), rearranged:

    * one attention for all of a mention's pairs: its K candidates' queries are one (K L, h)
      matrix against its (h, L) keys, so a batch is B GEMMs (one ``bmm``) instead of B K
      products of (L, h) x (h, L) (at B = 1 torch's broadcasting matmul folds the same way);
    * the mean over query positions of the softmax rows as one (1, L) x (L, L) product per
      pair (the released code's order: mean of the probabilities, then times V);
    * candidates in blocks of ``block_elements / (B L^2)`` so the attention stays in cache.

    The softmax is torch's fused one, as in the released code. Measured alternatives
    (bench/speed.py profiles): exp in place with the division folded into the mean, with
    and without clamping the shifted logits (exp of anything under -87 leaves the vectorised
    fast path: ~18x slower, seen with untrained weights) were 5-25% slower; the trained demo
    model's shifted logits stay above -31, far from that.
    """
    b, k, length, h = e_query.shape
    key = tglu.fc_key(m_tokens)  # (B, L, h)
    value = tglu.fc_value(m_tokens)  # (B, L, h)
    key_t = (key * (1.0 / math.sqrt(tglu.hidden))).transpose(1, 2)  # (B, h, L)
    queries = e_query.reshape(b, k * length, h)
    pbar = torch.empty(b, k, length, dtype=key.dtype, device=key.device)
    step = max(1, block_elements // (b * length * length))
    mean_w = torch.full((1, 1, length), 1.0 / length, dtype=key.dtype, device=key.device)
    for s in range(0, k, step):
        c = min(step, k - s)
        att = torch.bmm(queries[:, s * length : (s + c) * length], key_t)  # (B, c L, L)
        probs = att.softmax(dim=-1).view(b * c, length, length)
        pbar[:, s : s + c] = torch.bmm(mean_w.expand(b * c, 1, length), probs).view(b, c, length)
    ctx = tglu.layer_norm(torch.bmm(pbar, value))  # (B, K, L) @ (B, L, h) -> (B, K, h)
    g2l = (ctx * e_cls_fc).sum(-1)
    g2g = (m_cls.unsqueeze(1) * e_text_cls).sum(-1)  # (B, K); summed as the matcher sums
    return (g2l + g2g) / 2


def vdlu_candidates(
    matcher: MimicMatcher,
    m_image_cls: Tensor,
    m_image_tokens: Tensor,
    records: MimicEntityRecord,
    no_image: Tensor | None = None,
) -> Tensor:
    """VDLU scores (B, K) (inputs LayerNorm'd), ``VisionDualUnit.score(..., shared=False)``.

    ``no_image`` (B, K) bool marks the candidates without an image. When none of the
    candidates has one (WikiMEL: no entity has an image), every candidate's VDLU fields are the
    one no-image record (the store's image row 0), so VDLU is one pair per mention, broadcast
    to its list. Otherwise the matcher's own batched code runs on every pair: computing only the
    imaged pairs (gathered, scattered back) measured slower than all of them, even with a third
    of 1,000 candidates imageless (bench/speed.py profiles).
    """
    if no_image is not None and bool(no_image.all()):
        first = records.map(lambda t: t[:, :1])  # (B, 1, ...): all alike
        s = matcher.vdlu.score(
            m_image_cls, m_image_tokens, first.e2m_query, first.m2e_key, first.m2e_pooled, False
        )
        return s.expand(no_image.shape)
    return matcher.vdlu.score(
        m_image_cls,
        m_image_tokens,
        records.e2m_query,
        records.m2e_key,
        records.m2e_pooled,
        False,
    )


@torch.inference_mode()
def score_candidates(
    matcher: MimicMatcher,
    mentions: MimicFeatures,
    records: MimicEntityRecord,
    units: tuple[str, ...] | None = None,
    block_elements: int = CANDIDATE_BLOCK,
    no_image: Tensor | None = None,
) -> MimicScores:
    """``matcher.score_precomputed(mentions, records, units)`` for per-mention candidate
    records (B, K, ...) -> scores (B, K).

    TGLU goes through :func:`tglu_candidates`; VDLU through :func:`vdlu_candidates` (one pair
    per mention when ``no_image`` (B, K) says no candidate has an image); g2g and CMFU are
    (B, K, d) inner products. Every unit is computed, as ``score_precomputed`` does
    (the server explains with all three and the fusion stage reads them).
    """
    if records.text_cls.dim() != mentions.text_cls.dim() + 1 or (
        records.text_cls.shape[0] != mentions.text_cls.shape[0]
    ):
        raise ValueError(
            f"score_candidates scores per-mention candidate records (B={len(mentions)}, K, "
            f"...), got {tuple(records.text_cls.shape)}"
        )
    if no_image is not None and tuple(no_image.shape) != tuple(records.text_cls.shape[:2]):
        raise ValueError(
            f"no_image {tuple(no_image.shape)} must be (B, K) = {tuple(records.text_cls.shape[:2])}"
        )
    m = matcher._normalise(mentions)
    records = records.map(lambda t: t.to(m.text_cls.dtype))
    s_t = tglu_candidates(
        matcher.tglu,
        m.text_cls,
        m.text_tokens,
        records.text_cls,
        records.tglu_cls,
        records.tglu_query,
        block_elements,
    )
    s_v = vdlu_candidates(matcher, m.image_cls, m.image_tokens, records, no_image)
    h_m = matcher.cmfu.fuse(m.text_cls, m.image_tokens)  # (B, d)
    # summed as score_precomputed sums (a bmm rounds differently: 4 ulps at |S_C| ~ 60)
    s_c = (h_m.unsqueeze(1) * records.cmfu).sum(-1)
    return matcher._combine(s_t, s_v, s_c, units)


__all__ = [
    "CANDIDATE_BLOCK",
    "score_candidates",
    "tglu_candidates",
    "vdlu_candidates",
]
