"""A direct, per-equation MIMIC computation for ONE (mention, entity) pair at a time.

Written from ../shared/reference/mimic.md line by line, with no batching tricks, so the batched
and precomputed implementations in models/mimic.py can be checked against it. It reads the
weights of a MimicMatcher (whose parameter names are the released ones).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from models.mimic import MimicFeatures, MimicMatcher


def without_images(ent: MimicFeatures, blank: MimicFeatures, no_image: Tensor) -> MimicFeatures:
    """``ent`` with the image features of the candidates marked in ``no_image`` replaced by
    the one no-image record ``blank`` (what the store holds for an entity without an image)."""
    return MimicFeatures(
        ent.text_cls,
        ent.text_tokens,
        torch.where(no_image[..., None], blank.image_cls, ent.image_cls),
        torch.where(no_image[..., None, None], blank.image_tokens, ent.image_tokens),
    )


def randomise_layernorms(module: torch.nn.Module) -> torch.nn.Module:
    """LayerNorm gains/biases default to 1/0, which would hide a LayerNorm applied in the wrong
    place: give them non-trivial values (in place)."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
    return module


def _lin(layer: torch.nn.Linear, x: Tensor) -> Tensor:
    return x @ layer.weight.T + layer.bias


def _ln(layer: torch.nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)


def _dual(block: torch.nn.Module, a_cls: Tensor, b_cls: Tensor, b_tokens: Tensor) -> Tensor:
    a = _lin(block.cls_fc, a_cls)
    b = _lin(block.cls_fc, b_cls)
    p = _lin(block.tokens_fc, b_tokens).mean(dim=0)  # mean over tokens of tokens_fc(b_tokens)
    c = _lin(block.fc, _ln(block.add_layer_norm, p + a))
    g = torch.tanh(_lin(block.gate_fc, c))  # one scalar
    h = _ln(block.layer_norm, c * g + b)
    return (h * _ln(block.layer_norm, a)).sum()


def _cmfu_side(cmfu: torch.nn.Module, text_cls: Tensor, image_tokens: Tensor) -> Tensor:
    t = _lin(cmfu.text_fc, text_cls)
    p = _lin(cmfu.image_fc, image_tokens)
    alpha = torch.softmax(p @ t, dim=0)
    ctx = (alpha[:, None] * p).sum(dim=0)
    return _ln(cmfu.gate_layer_norm, t * torch.tanh(_lin(cmfu.gate_fc, t)) + ctx)


def pair_scores(
    m: MimicMatcher,
    m_text_cls: Tensor,
    m_text_tokens: Tensor,
    m_image_cls: Tensor,
    m_image_tokens: Tensor,
    e_text_cls: Tensor,
    e_text_tokens: Tensor,
    e_image_cls: Tensor,
    e_image_tokens: Tensor,
) -> tuple[Tensor, ...]:
    """(S, S_T, S_V, S_C) for one mention and one entity (unbatched tensors)."""
    mtc, etc = _ln(m.text_cls_layernorm, m_text_cls), _ln(m.text_cls_layernorm, e_text_cls)
    mtt, ett = (
        _ln(m.text_tokens_layernorm, m_text_tokens),
        _ln(m.text_tokens_layernorm, e_text_tokens),
    )
    mic, eic = _ln(m.image_cls_layernorm, m_image_cls), _ln(m.image_cls_layernorm, e_image_cls)
    mit, eit = (
        _ln(m.image_tokens_layernorm, m_image_tokens),
        _ln(m.image_tokens_layernorm, e_image_tokens),
    )
    # TGLU: entity tokens are the queries, mention tokens keys and values
    t = m.tglu
    q, k, v = _lin(t.fc_query, ett), _lin(t.fc_key, mtt), _lin(t.fc_value, mtt)
    h = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v
    ctx = _ln(t.layer_norm, h.mean(dim=0))
    g2l = (_lin(t.fc_cls, etc) * ctx).sum()
    g2g = (mtc * etc).sum()
    s_t = (g2l + g2g) / 2
    # VDLU
    s_v = (
        _dual(m.vdlu.dual_ent2men, eic, mic, mit) + _dual(m.vdlu.dual_men2ent, mic, eic, eit)
    ) / 2
    # CMFU
    s_c = (_cmfu_side(m.cmfu, mtc, mit) * _cmfu_side(m.cmfu, etc, eit)).sum()
    return (s_t + s_v + s_c) / 3, s_t, s_v, s_c
