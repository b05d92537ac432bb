"""MIMIC against a direct per-pair computation, and precompute == direct on fresh inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.mimic import MimicConfig, MimicFeatures, MimicMatcher, in_batch_loss
from tests.reference_mimic import pair_scores, randomise_layernorms

CFG = MimicConfig(dt=32, dv=12, tglu_hidden_dim=16, idlu_hidden_dim=16, cmfu_hidden_dim=16)
L, P = 7, 5  # text tokens, image tokens


def _feats(
    *lead: int,
    dtype: torch.dtype = torch.float64,
    cfg: MimicConfig = CFG,
    gen: torch.Generator | None = None,
) -> MimicFeatures:
    def r(*s: int) -> torch.Tensor:
        return torch.randn(*lead, *s, generator=gen, dtype=dtype)

    return MimicFeatures(r(cfg.dt), r(L, cfg.dt), r(cfg.dv), r(P, cfg.dv))


def _matcher(cfg: MimicConfig = CFG, seed: int = 0) -> MimicMatcher:
    torch.manual_seed(seed)
    m = MimicMatcher(cfg)
    randomise_layernorms(m)
    return m.eval()


def _direct(m: MimicMatcher, men: MimicFeatures, ent: MimicFeatures, shared: bool) -> torch.Tensor:
    B = len(men)
    K = ent.text_cls.shape[0] if shared else ent.text_cls.shape[1]
    out = torch.zeros(4, B, K, dtype=men.text_cls.dtype)
    for b in range(B):
        for k in range(K):

            def pick(t: torch.Tensor, b: int = b, k: int = k) -> torch.Tensor:
                return t[k] if shared else t[b, k]

            s = pair_scores(
                m,
                men.text_cls[b],
                men.text_tokens[b],
                men.image_cls[b],
                men.image_tokens[b],
                pick(ent.text_cls),
                pick(ent.text_tokens),
                pick(ent.image_cls),
                pick(ent.image_tokens),
            )
            out[:, b, k] = torch.stack(s)
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_every_unit_matches_the_direct_equations(shared: bool) -> None:
    m = _matcher().double()
    g = torch.Generator().manual_seed(1)
    men = _feats(3, gen=g)
    ent = _feats(4, gen=g) if shared else _feats(3, 4, gen=g)
    with torch.no_grad():
        got = m.score(men, ent)
        ref = _direct(m, men, ent, shared)
    for i, name in enumerate(["score", "tglu", "vdlu", "cmfu"]):
        torch.testing.assert_close(
            getattr(got, name), ref[i], rtol=1e-10, atol=1e-10, msg=f"unit {name}"
        )


@pytest.mark.parametrize(
    ("B", "K", "entity_images"),
    [(1, 1, True), (1, 5, True), (4, 1, True), (3, 7, False), (2, 1000, True)],
)
def test_precompute_equals_direct(B: int, K: int, entity_images: bool) -> None:
    m = _matcher(seed=B * 100 + K)
    g = torch.Generator().manual_seed(K)
    men = _feats(B, dtype=torch.float32, gen=g)
    ent = _feats(B, K, dtype=torch.float32, gen=g)
    if not entity_images:
        # An entity without an image: every such entity carries the same no-image features.
        blank = _feats(1, dtype=torch.float32, gen=g)
        ent = MimicFeatures(
            ent.text_cls,
            ent.text_tokens,
            blank.image_cls.expand(B, K, -1),
            blank.image_tokens.expand(B, K, -1, -1),
        )
    with torch.no_grad():
        rec = m.precompute_entities(ent)
        fast = m.score_precomputed(men, rec)
        if K <= 7:
            ref = _direct(
                m.double(), men.map(torch.Tensor.double), ent.map(torch.Tensor.double), shared=False
            )
            m.float()
        else:  # the per-pair loop is slow: compare K=1000 with the unfused batched forward
            ref = torch.stack(
                [
                    torch.stack(
                        [
                            torch.stack(
                                pair_scores(
                                    m,
                                    *(getattr(men, f)[b] for f in _F),
                                    *(getattr(ent, f)[b, k] for f in _F),
                                )
                            )
                            for k in range(0, K, 97)
                        ],
                        dim=-1,
                    )
                    for b in range(B)
                ],
                dim=1,
            )
            fast = type(fast)(*(t[:, ::97] for t in (fast.score, fast.tglu, fast.vdlu, fast.cmfu)))
    for i, name in enumerate(["score", "tglu", "vdlu", "cmfu"]):
        torch.testing.assert_close(
            getattr(fast, name).double(), ref[i].double(), rtol=0, atol=1e-5, msg=f"unit {name}"
        )


_F = ("text_cls", "text_tokens", "image_cls", "image_tokens")


def test_shared_and_per_mention_layouts_agree() -> None:
    m = _matcher()
    men, ent = _feats(3, dtype=torch.float32), _feats(5, dtype=torch.float32)
    with torch.no_grad():
        shared = m.score(men, ent).score  # (3, 5)
        per = m.score(men, ent.map(lambda t: t.unsqueeze(0).expand(3, *t.shape))).score
        rec = m.precompute_entities(ent)
        rows = torch.cat(
            [m.score_precomputed(men.map(lambda t, i=i: t[i : i + 1]), rec).score for i in range(3)]
        )
    torch.testing.assert_close(shared, per, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared, rows, rtol=0, atol=1e-5)  # batch of 3 == 3 single calls


def test_units_ablation_and_loss() -> None:
    m = _matcher()
    men, ent = _feats(4, dtype=torch.float32), _feats(4, dtype=torch.float32)
    s = m.score(men, ent)
    torch.testing.assert_close(s.score, (s.tglu + s.vdlu + s.cmfu) / 3)
    only_t = m.score(men, ent, units=("tglu",))
    torch.testing.assert_close(only_t.score, s.tglu)
    two = m.score(men, ent, units=("tglu", "cmfu"))
    torch.testing.assert_close(two.score, (s.tglu + s.cmfu) / 2)
    labels = torch.arange(4)
    want = sum(F.cross_entropy(x, labels) for x in (s.score, s.tglu, s.vdlu, s.cmfu))
    torch.testing.assert_close(in_batch_loss(s), want)
    torch.testing.assert_close(
        in_batch_loss(s, units=("vdlu",)),
        F.cross_entropy(s.score, labels) + F.cross_entropy(s.vdlu, labels),
    )
    with pytest.raises(ValueError):
        MimicConfig(units=("tglu", "nope"))


def test_bad_entity_shape_is_refused() -> None:
    m = _matcher()
    men = _feats(3, dtype=torch.float32)
    with pytest.raises(ValueError, match="fit neither"):
        m.score(men, _feats(2, 4, dtype=torch.float32))


def test_parameter_names_are_the_released_ones() -> None:
    names = set(MimicMatcher(MimicConfig()).state_dict())
    released = {
        "text_cls_layernorm.weight",
        "text_tokens_layernorm.bias",
        "image_cls_layernorm.weight",
        "image_tokens_layernorm.bias",
        "tglu.fc_query.weight",
        "tglu.fc_key.weight",
        "tglu.fc_value.bias",
        "tglu.fc_cls.weight",
        "tglu.layer_norm.weight",
        "vdlu.dual_ent2men.cls_fc.weight",
        "vdlu.dual_ent2men.tokens_fc.weight",
        "vdlu.dual_ent2men.fc.weight",
        "vdlu.dual_ent2men.gate_fc.weight",
        "vdlu.dual_ent2men.add_layer_norm.weight",
        "vdlu.dual_men2ent.layer_norm.bias",
        "cmfu.text_fc.weight",
        "cmfu.image_fc.weight",
        "cmfu.gate_fc.bias",
        "cmfu.gate_layer_norm.weight",
        "cmfu.context_layer_norm.weight",
    }
    assert released <= names
    assert len(names) == 52  # (4 LNs + TGLU 5 + 2 x DUAL 6 + CMFU 5) modules x (weight, bias)
    sd = MimicMatcher(MimicConfig()).state_dict()
    assert sd["vdlu.dual_ent2men.gate_fc.weight"].shape == (1, 96)
    assert sd["tglu.fc_query.weight"].shape == (96, 512)


def test_retrieval_vectors_are_the_exact_inner_product_part() -> None:
    m = _matcher()
    men, ent = _feats(3, dtype=torch.float32), _feats(6, dtype=torch.float32)
    with torch.no_grad():
        s = m.score(men, ent)
        rec = m.precompute_entities(ent)
        q, k = m.retrieval_queries(men), m.retrieval_keys(rec)
        assert q.shape == (3, m.retrieval_dim()) and k.shape == (6, m.retrieval_dim())
        mt = m.text_cls_layernorm(men.text_cls)
        g2g = mt @ rec.text_cls.T
        torch.testing.assert_close(q @ k.T, g2g / 2 + s.cmfu, rtol=0, atol=1e-5)
        # the rest of 3 x S is TGLU's attention half and VDLU
        rest = 3 * s.score - q @ k.T
        torch.testing.assert_close(rest, (s.tglu - g2g / 2) + s.vdlu, rtol=0, atol=1e-4)
