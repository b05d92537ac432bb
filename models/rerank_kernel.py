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
# VDLU per image record (vdlu_candidates) only pays when it saves many pairs: below this many
# (mention, candidate) pairs, or when fewer than half of them share a record, the extra
# unique / gather ops cost more than the DUAL products they save.
GROUP_MIN_PAIRS = 1024


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
    image_groups: Tensor | None = None,
) -> Tensor:
    """VDLU scores (B, K) (inputs LayerNorm'd), ``VisionDualUnit.score(..., shared=False)``.

    Without ``image_groups`` it is the matcher's own batched code. With them ((B, K): equal
    values = equal VDLU fields, e.g. the store's image rows, where every candidate without an
    image shares the no-image record), each DUAL block runs once per distinct (mention,
    image record): the mention-side projections once per mention, then only the (h,) vectors
    of each group are gathered.
    """
    if image_groups is not None and image_groups.numel() < GROUP_MIN_PAIRS:
        image_groups = None
    if image_groups is None:
        return matcher.vdlu.score(
            m_image_cls,
            m_image_tokens,
            records.e2m_query,
            records.m2e_key,
            records.m2e_pooled,
            False,
        )
    b, k = image_groups.shape
    device = image_groups.device
    groups = image_groups.to(torch.long)
    pair_key = torch.arange(b, device=device)[:, None] * (int(groups.max()) + 1) + groups
    _, inverse = torch.unique(pair_key.reshape(-1), return_inverse=True)
    n = b * k
    if 2 * (int(inverse.max()) + 1) > n:  # most pairs have their own record: nothing to save
        return vdlu_candidates(matcher, m_image_cls, m_image_tokens, records, None)
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=device), "amin")
    bi, ki = first // k, first % k  # one representative candidate per group, (U,)
    e2m, m2e = matcher.vdlu.dual_ent2men, matcher.vdlu.dual_men2ent
    # entity -> mention: a = entity, b = mention (VisionDualUnit.score, per group)
    s_e2m = e2m.combine(
        records.e2m_query[bi, ki], e2m.cls_fc(m_image_cls)[bi], e2m.pooled(m_image_tokens)[bi]
    )
    # mention -> entity: a = mention, b = entity
    s_m2e = m2e.combine(
        m2e.cls_fc(m_image_cls)[bi], records.m2e_key[bi, ki], records.m2e_pooled[bi, ki]
    )
    return ((s_e2m + s_m2e) / 2)[inverse].view(b, k)


@torch.inference_mode()
def score_candidates(
    matcher: MimicMatcher,
    mentions: MimicFeatures,
    records: MimicEntityRecord,
    units: tuple[str, ...] | None = None,
    block_elements: int = CANDIDATE_BLOCK,
    image_groups: Tensor | None = None,
) -> MimicScores:
    """``matcher.score_precomputed(mentions, records, units)`` for per-mention candidate
    records (B, K, ...) -> scores (B, K).

    TGLU goes through :func:`tglu_candidates`; VDLU through :func:`vdlu_candidates` (once per
    distinct image record of a mention's list when ``image_groups`` (B, K) is given); g2g and
    CMFU are (B, K, d) inner products. Every unit is computed, as ``score_precomputed`` does
    (the server explains with all three and the fusion stage reads them).
    """
    if records.text_cls.dim() != mentions.text_cls.dim() + 1 or (
        records.text_cls.shape[0] != mentions.text_cls.shape[0]
    ):
        raise ValueError(
            f"score_candidates scores per-mention candidate records (B={len(mentions)}, K, "
            f"...), got {tuple(records.text_cls.shape)}"
        )
    if image_groups is not None and tuple(image_groups.shape) != tuple(records.text_cls.shape[:2]):
        raise ValueError(
            f"image_groups {tuple(image_groups.shape)} must be (B, K) = "
            f"{tuple(records.text_cls.shape[:2])}"
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
    s_v = vdlu_candidates(matcher, m.image_cls, m.image_tokens, records, image_groups)
    h_m = matcher.cmfu.fuse(m.text_cls, m.image_tokens)  # (B, d)
    # summed as score_precomputed sums (a bmm rounds differently: 4 ulps at |S_C| ~ 60)
    s_c = (h_m.unsqueeze(1) * records.cmfu).sum(-1)
    return matcher._combine(s_t, s_v, s_c, units)


__all__ = [
    "CANDIDATE_BLOCK",
    "GROUP_MIN_PAIRS",
    "score_candidates",
    "tglu_candidates",
    "vdlu_candidates",
]
