"""The serving kernel (models/rerank_kernel.py) == MimicMatcher.score_precomputed, and == the
released per-pair computation (tests/reference_mimic.py), on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from models.mimic import MimicConfig, MimicFeatures, MimicMatcher
from models.rerank_kernel import score_candidates, tglu_candidates
from tests.reference_mimic import pair_scores, randomise_layernorms, without_images

CFG = MimicConfig(dt=32, dv=12, tglu_hidden_dim=16, idlu_hidden_dim=16, cmfu_hidden_dim=16)
L, P = 7, 5  # text tokens, image tokens
FIELDS = ("score", "tglu", "vdlu", "cmfu")
_F = ("text_cls", "text_tokens", "image_cls", "image_tokens")


def _feats(
    *lead: int, dtype: torch.dtype, gen: torch.Generator, cfg: MimicConfig = CFG, length: int = L
) -> MimicFeatures:
    def r(*s: int) -> torch.Tensor:
        return torch.randn(*lead, *s, generator=gen, dtype=dtype)

    return MimicFeatures(r(cfg.dt), r(length, cfg.dt), r(cfg.dv), r(P, cfg.dv))


def _matcher(seed: int, cfg: MimicConfig = CFG, dtype: torch.dtype = torch.float32) -> MimicMatcher:
    torch.manual_seed(seed)
    m = MimicMatcher(cfg)
    randomise_layernorms(m)
    return m.to(dtype).eval()


@pytest.mark.parametrize(
    ("b", "k", "block"),
    [(1, 1, None), (1, 5, 1), (4, 1, None), (3, 7, 2 * 3 * L * L), (2, 13, 10**9), (5, 9, 1)],
)
def test_kernel_equals_score_precomputed(b: int, k: int, block: int | None) -> None:
    gen = torch.Generator().manual_seed(b * 31 + k)
    m = _matcher(seed=k)
    men = _feats(b, dtype=torch.float32, gen=gen)
    rec = m.precompute_entities(_feats(b, k, dtype=torch.float32, gen=gen))
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec)
        got = score_candidates(m, men, rec, block_elements=block or 1 << 16)
    for f in FIELDS:
        assert getattr(got, f).shape == (b, k)
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=0, atol=1e-5, msg=f)


@pytest.mark.parametrize("units", [("tglu",), ("vdlu", "cmfu"), ("tglu", "vdlu", "cmfu")])
def test_kernel_equals_the_released_per_pair_computation(units: tuple[str, ...]) -> None:
    m = _matcher(seed=3).double()
    gen = torch.Generator().manual_seed(9)
    men = _feats(3, dtype=torch.float64, gen=gen)
    ent = _feats(3, 4, dtype=torch.float64, gen=gen)
    with torch.inference_mode():
        got = score_candidates(m, men, m.precompute_entities(ent), units=units)
    ref = torch.zeros(4, 3, 4, dtype=torch.float64)
    for b in range(3):
        for k in range(4):
            s = pair_scores(
                m, *(getattr(men, f)[b] for f in _F), *(getattr(ent, f)[b, k] for f in _F)
            )
            ref[:, b, k] = torch.stack(s)
    ref[0] = sum(ref[1 + ("tglu", "vdlu", "cmfu").index(u)] for u in units) / len(units)
    for i, f in enumerate(FIELDS):
        torch.testing.assert_close(getattr(got, f), ref[i], rtol=0, atol=1e-10, msg=f)


def test_kernel_at_serving_sizes_fp16_records_and_entities_without_images() -> None:
    """The default widths (L = 40, h = 96), K = 1000, records as the store holds them (fp16),
    a third of the candidates sharing the no-image features."""
    cfg = MimicConfig(dt=64, dv=96)
    m = _matcher(seed=1, cfg=cfg)
    gen = torch.Generator().manual_seed(2)
    men = _feats(2, dtype=torch.float32, gen=gen, cfg=cfg, length=40)
    ent = _feats(2, 1000, dtype=torch.float32, gen=gen, cfg=cfg, length=40)
    blank = _feats(1, dtype=torch.float32, gen=gen, cfg=cfg, length=40)
    no_image = torch.arange(1000) % 3 == 0
    ent = without_images(ent, blank, no_image)
    rec = m.precompute_entities(ent).map(lambda t: t.half())
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec)
        got = score_candidates(m, men, rec)
    for f in FIELDS:
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=0, atol=1e-5, msg=f)


@pytest.mark.parametrize("share", [1.0, 0.5, 0.0])
def test_vdlu_for_imageless_candidates_equals_every_pair(
    share: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imageless candidates all carry the no-image record: a batch of only those scores VDLU
    once per mention (the per-pair VDLU never runs), any other the usual way; same scores."""
    m = _matcher(seed=6)
    gen = torch.Generator().manual_seed(7)
    b, k = 4, 9
    men = _feats(b, dtype=torch.float32, gen=gen)
    ent = _feats(b, k, dtype=torch.float32, gen=gen)
    blank = _feats(1, dtype=torch.float32, gen=gen)
    no_image = torch.rand(b, k, generator=gen) < share
    ent = without_images(ent, blank, no_image)
    rec = m.precompute_entities(ent)
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec)
        calls: list[tuple[int, ...]] = []
        plain = m.vdlu.score

        def spy(*args: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(args[2].shape[:2]))
            return plain(*args)

        monkeypatch.setattr(m.vdlu, "score", spy)
        got = score_candidates(m, men, rec, no_image=no_image)
        with pytest.raises(ValueError, match="no_image"):
            score_candidates(m, men, rec, no_image=no_image[:1])
    assert calls == [(b, 1) if share == 1.0 else (b, k)]
    for f in FIELDS:
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=0, atol=1e-5, msg=f)


def test_tglu_candidates_is_the_tglu_unit() -> None:
    m = _matcher(seed=4)
    gen = torch.Generator().manual_seed(5)
    men = _feats(2, dtype=torch.float32, gen=gen)
    rec = m.precompute_entities(_feats(2, 6, dtype=torch.float32, gen=gen))
    nm = m._normalise(men)
    got = tglu_candidates(
        m.tglu, nm.text_cls, nm.text_tokens, rec.text_cls, rec.tglu_cls, rec.tglu_query, 3 * L * L
    )
    want = m.tglu.score(
        nm.text_cls, nm.text_tokens, rec.text_cls, rec.tglu_cls, rec.tglu_query, False
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_kernel_refuses_shared_records() -> None:
    m = _matcher(seed=0)
    gen = torch.Generator().manual_seed(0)
    men = _feats(2, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="per-mention"):
        score_candidates(m, men, m.precompute_entities(_feats(5, dtype=torch.float32, gen=gen)))
    with pytest.raises(ValueError, match="per-mention"):
        score_candidates(m, men, m.precompute_entities(_feats(3, 4, dtype=torch.float32, gen=gen)))
