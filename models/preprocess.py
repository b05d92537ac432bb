"""The ONE place that turns raw inputs into model inputs. Training, the index job and the
service all call these functions, so what is served is exactly what was trained.

Text (MIMIC's released ``utils/dataset.py``):
    mention side:  ``mention + " [SEP] " + sentence``
    entity side:   ``name + " [SEP] " + attributes``
    tokenised with ``padding="max_length", max_length=40, truncation=True``; padding is part of
    the model input (MIMIC masks nothing), so every text is exactly ``max_length`` tokens.

Images:
    ``resize((224, 224), LANCZOS)`` of the decoded image (aspect not kept, as the released code),
    then the backbone's own normalisation: the CLIP image processor of the checkpoint folder for
    the ``clip`` backend; RGB / 255 then ImageNet mean/std for the EfficientNet backend.
    **No image** (absent, or unreadable) = an all-zero normalised pixel tensor that still goes
    through the vision tower, for both backends (the released rule for CLIP).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

MENTION_TEMPLATE = "{mention} [SEP] {sentence}"
ENTITY_TEMPLATE = "{name} [SEP] {attributes}"
TEXT_MAX_LENGTH = 40  # the released configs; scores depend on padding to exactly this length
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Decompression-bomb guard for every decode path (PIL raises above 2x this).
MAX_IMAGE_PIXELS = 40_000_000


def mention_text(mention: str, sentence: str) -> str:
    """The mention-side text template."""
    return MENTION_TEMPLATE.format(mention=mention, sentence=sentence)


def entity_text(name: str, attributes: str) -> str:
    """The entity-side text template."""
    return ENTITY_TEMPLATE.format(name=name, attributes=attributes)


class ImageDecodeError(ValueError):
    """An image that cannot be decoded (corrupt, unsupported, or too many pixels)."""


def decode_image(
    source: str | os.PathLike[str] | bytes, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Open and fully decode an image from a path or bytes, refusing decompression bombs.

    Raises :class:`ImageDecodeError` with the reason; callers decide the fallback (the
    no-image rule) and count it. Never returns a half-decoded image.
    """
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        w, h = img.size
        if w * h > max_pixels:
            raise ImageDecodeError(f"image has {w}x{h} pixels, more than {max_pixels}")
        img.load()  # decode now: a truncated file fails here, not later in a batch
        return img
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from exc


def resize_for_model(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """The released resize: ``resize((size, size), LANCZOS)`` then RGB."""
    return img.resize((size, size), Image.Resampling.LANCZOS).convert("RGB")


@dataclass(frozen=True)
class NormalizeTransform:
    """RGB / 255 then (x - mean) / std, as a (3, size, size) float tensor."""

    size: int = IMAGE_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, img: Image.Image) -> torch.Tensor:
        rgb = np.asarray(resize_for_model(img, self.size), dtype=np.float32) / 255.0
        norm = (rgb - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1)))


class ClipImageTransform:
    """The released CLIP pipeline: LANCZOS resize to 224, then the checkpoint's processor."""

    def __init__(self, processor: Any, size: int = IMAGE_SIZE) -> None:
        self.processor = processor
        self.size = size
        # transformers 4 gives crop_size as a dict, 5 as a SizeDict object
        crop = getattr(processor, "crop_size", None)
        height = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
        self.out_size = int(height) if height else size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = self.processor(resize_for_model(img, self.size), return_tensors="pt")
        return pixels["pixel_values"][0]


ImageTransform = Callable[[Image.Image], torch.Tensor]
# A decoded image, or its pixels already through the backbone's transform, (3, S, S): the
# server runs the transform on its decode threads so the model's thread does not (unless the
# image tower runs beside the text tower, models/towers.py: then the tower runs it).
ModelImage = Image.Image | torch.Tensor


@dataclass(frozen=True)
class ImageBatch:
    """pixel_values: (B, 3, H, W), zero rows where has_image is False; has_image: (B,)."""

    pixel_values: torch.Tensor
    has_image: torch.Tensor


def image_batch(
    images: Sequence[ModelImage | None], transform: ImageTransform, out_size: int
) -> ImageBatch:
    """Stack decoded images into a batch; ``None`` takes the no-image rule (zero pixels).
    A tensor is taken as ``transform``'s output already (see :data:`ModelImage`)."""
    pixels = torch.zeros((len(images), 3, out_size, out_size), dtype=torch.float32)
    has = torch.zeros(len(images), dtype=torch.bool)
    for i, img in enumerate(images):
        if img is None:
            continue
        if isinstance(img, torch.Tensor):
            if tuple(img.shape) != (3, out_size, out_size):
                raise ValueError(
                    f"pixels {tuple(img.shape)}, but this transform gives (3, {out_size}, {out_size})"
                )
            pixels[i] = img
        else:
            pixels[i] = transform(img)
        has[i] = True
    return ImageBatch(pixel_values=pixels, has_image=has)


def load_image_or_none(
    path: str | os.PathLike[str] | None, on_error: Callable[[str, str], None] | None = None
) -> Image.Image | None:
    """Decode an image file for the model, or ``None`` (the no-image rule) if absent/unreadable.

    ``on_error(path, reason)`` is told of each unreadable file so callers can count it.
    """
    if path is None:
        return None
    try:
        return decode_image(path)
    except (ImageDecodeError, FileNotFoundError) as exc:
        if on_error is not None:
            on_error(str(path), str(exc))
        else:
            logger.warning("unreadable image %s (%s): using the no-image rule", path, exc)
        return None


class TextTokenizer:
    """Tokenise to exactly ``max_length`` tokens (padding + truncation), as the released code."""

    def __init__(self, tokenizer: Any, max_length: int = TEXT_MAX_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str], to_longest: bool = False) -> dict[str, torch.Tensor]:
        """``to_longest``: pad only to the batch's longest text (still truncated at
        ``max_length``), for callers that use nothing but the masked pooled feature, which
        padding does not change; a short name then costs a few tokens, not ``max_length``."""
        enc = self.tokenizer(
            list(texts),
            padding="longest" if to_longest else "max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


__all__ = [
    "ENTITY_TEMPLATE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SIZE",
    "MAX_IMAGE_PIXELS",
    "MENTION_TEMPLATE",
    "TEXT_MAX_LENGTH",
    "ClipImageTransform",
    "ImageBatch",
    "ImageDecodeError",
    "ImageTransform",
    "ModelImage",
    "NormalizeTransform",
    "TextTokenizer",
    "decode_image",
    "entity_text",
    "image_batch",
    "load_image_or_none",
    "mention_text",
    "resize_for_model",
]
