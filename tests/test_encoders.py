"""Encoders: documented shapes, the no-image rule, and the fused inference path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from models.encoders import ClipBackbone, EncoderConfig, MimicEncoder, MiniLmEffNetBackbone
from models.preprocess import ImageDecodeError, decode_image, entity_text, mention_text


@pytest.fixture(scope="module")
def default_encoder() -> MimicEncoder:
    torch.manual_seed(0)
    return MimicEncoder(EncoderConfig(), MiniLmEffNetBackbone.from_packages()).eval()


def _img(seed: int, size: tuple[int, int] = (60, 40)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def test_default_backend_shapes_and_no_image_rule(default_encoder: MimicEncoder) -> None:
    enc = default_encoder
    assert enc.config.text_dim == 384 and enc.config.num_image_tokens == 49
    with torch.inference_mode():
        f = enc.encode(
            [mention_text("Ada", "Ada wrote notes."), entity_text("Ada L", "x")], [_img(0), None]
        )
        assert f.text_cls.shape == (2, 384) and f.text_tokens.shape == (2, 40, 384)
        assert f.image_cls.shape == (2, 96) and f.image_tokens.shape == (2, 49, 96)
        torch.testing.assert_close(f.text_cls.norm(dim=-1), torch.ones(2))
        # no image == a zero pixel tensor through the tower
        zero = enc.backbone.encode_pixels(torch.zeros(1, 3, 224, 224))
        raw = enc.image_features([None])
        torch.testing.assert_close(raw.tokens, zero.tokens)
        # a batch mixing images and none equals one call per item
        mixed = enc.image_features([_img(1), None, _img(2)])
        one = enc.image_features([_img(2)])
        torch.testing.assert_close(mixed.tokens[2], one.tokens[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mixed.tokens[1], zero.tokens[0])


def test_fused_inference_equals_training_graph(default_encoder: MimicEncoder) -> None:
    bb = default_encoder.backbone
    x = torch.randn(3, 3, 224, 224)
    with torch.enable_grad():
        ref = bb.encode_pixels(x)  # plain modules (used when gradients are on)
    with torch.inference_mode():
        fast = bb.encode_pixels(x)  # BatchNorm folded, channels-last
    torch.testing.assert_close(fast.tokens, ref.tokens.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.global_, ref.global_.detach(), rtol=1e-4, atol=1e-4)


def test_text_is_padded_to_exactly_max_length(default_encoder: MimicEncoder) -> None:
    tok = default_encoder.backbone.tokenizer
    enc = tok(["short", "word " * 200])
    assert enc["input_ids"].shape == (2, 40)
    assert enc["attention_mask"][0].sum() < 40 and enc["attention_mask"][1].sum() == 40


def test_clip_backbone_refuses_mismatched_widths(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig.from_pretrained(tiny_clip_dir)
    cfg.projection_dim = 16
    model = CLIPModel(cfg)
    with pytest.raises(ValueError, match="projection_dim"):
        ClipBackbone(model, None, None, 40)


def test_decode_refuses_bombs_and_garbage(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("L", (5000, 5000)).save(big)
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_image(big, max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image")
    ok = decode_image(big.read_bytes())
    assert ok.size == (5000, 5000)


def test_a_smaller_image_side_survives_a_checkpoint(tmp_path: Path) -> None:
    # mel-train --image-size: the side is recorded in the model config, so the index job and
    # the server (which rebuild the towers from the checkpoint) encode images the same way
    from models.model import LinkingModel

    model = LinkingModel.for_backbone(MiniLmEffNetBackbone.from_packages(image_size=96))
    assert model.config.encoder.image_size == 96
    model.save_pretrained(tmp_path / "m")
    back = LinkingModel.from_pretrained(tmp_path / "m")
    assert back.config.encoder.image_size == 96 and back.config.encoder.num_image_tokens == 9
    with torch.inference_mode():
        f = back.encoder.encode([mention_text("Ada", "Ada wrote notes.")], [_img(3)])
    assert f.image_tokens.shape == (1, 9, 96)
