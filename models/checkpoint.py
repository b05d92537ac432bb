"""One checkpoint format for every model class (transformers' ``PreTrainedModel`` habit).

A checkpoint is one folder::

    <ckpt>/config.json         {"format": <name>, "version": <n>, **config.to_dict(),
                                **weights_identity(), "meta": {...}}
    <ckpt>/model.safetensors   checkpoint_state()

:class:`PretrainedModule` owns writing both files (each to a ``.tmp`` then renamed over, so an
interrupted save never leaves a half-written file under the real name; config.json goes
last, and is what marks a folder as a checkpoint), the format / version check on loading, the
free-form ``meta`` and :meth:`~PretrainedModule.fingerprint`. A model class supplies only what
differs: its format name and version, its config class, which state it stores
(:meth:`~PretrainedModule.checkpoint_state`), the identity of weights stored elsewhere
(:meth:`~PretrainedModule.weights_identity`) and how it rebuilds itself from its config
(:meth:`~PretrainedModule.from_config`).

The fingerprint is sha256 over the config (sorted-key JSON), the weights-identity values and
every stored tensor (key, then float32 bytes), in sorted key order; 16 hex chars. Index
manifests and the server's caches are keyed on it: its bytes must never change for a given
model, or every index built before stops matching.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _replace_atomically(path: Path, write: Any) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


class PretrainedModule(nn.Module):
    """Base of the checkpointed models: config.json + model.safetensors, meta, fingerprint."""

    checkpoint_format: ClassVar[str]  # config.json "format"
    checkpoint_version: ClassVar[int]  # newest version this class writes and reads
    checkpoint_kind: ClassVar[str] = "model"  # how error messages name the checkpoint
    config_class: ClassVar[Any]  # has from_dict(config.json document) -> config

    config: Any  # has to_dict() -> dict (JSON-serialisable)

    def __init__(self) -> None:
        super().__init__()
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ what a model supplies
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The tensors model.safetensors stores (CPU, contiguous); default: the whole state."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def weights_identity(self) -> dict[str, str]:
        """Identity of weights the checkpoint does not store (e.g. a backbone installed from
        packages): written to config.json before ``meta`` and hashed into the fingerprint."""
        return {}

    def save_sources(self, folder: Path) -> None:
        """Write what :meth:`from_config` reads beyond config.json and the weights."""

    def may_lack(self, key: str) -> bool:
        """Whether the checkpoint may leave out this state key (it comes from elsewhere)."""
        return False

    @classmethod
    def from_config(cls, config: Any, folder: Path) -> Self:
        """A fresh model for ``config``; ``folder`` holds what :meth:`save_sources` wrote."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the base's part
    def save_pretrained(
        self, folder: str | os.PathLike[str], meta: dict[str, Any] | None = None
    ) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_sources(folder)
        state = self.checkpoint_state()
        _replace_atomically(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
        self.meta = {**self.meta, **(meta or {})}
        doc = {
            "format": self.checkpoint_format,
            "version": self.checkpoint_version,
            **self.config.to_dict(),
            **self.weights_identity(),
            "meta": self.meta,
        }
        text = json.dumps(doc, indent=1)
        _replace_atomically(
            folder / CONFIG_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8")
        )
        return folder

    @classmethod
    def read_config(cls, folder: str | os.PathLike[str]) -> dict[str, Any]:
        """The checkpoint's config.json document, after the format and version check."""
        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a {cls.checkpoint_kind} checkpoint (no {CONFIG_FILE})"
            )
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        fmt, version = cls.checkpoint_format, cls.checkpoint_version
        if doc.get("format") != fmt or doc.get("version", 0) > version:
            raise ValueError(
                f"{folder}: not a {fmt} v<={version} checkpoint (format={doc.get('format')!r})"
            )
        return doc

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], map_location: str = "cpu") -> Self:
        folder = Path(folder)
        doc = cls.read_config(folder)
        model = cls.from_config(cls.config_class.from_dict(doc), folder)
        state = load_file(str(folder / WEIGHTS_FILE), device=map_location)
        # every stored key must fit, and only what may_lack may be absent
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not model.may_lack(k)]
        if missing or unexpected:
            raise ValueError(
                f"{folder}: checkpoint does not fit the {cls.checkpoint_kind}: "
                f"missing={missing[:5]} unexpected={unexpected[:5]}"
            )
        model.meta = doc.get("meta", {})
        return model.eval()

    def fingerprint(self) -> str:
        """sha256 over the config, the weights' identity and every stored weight, 16 hex."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for value in self.weights_identity().values():
            h.update(value.encode())
        for k, v in sorted(self.checkpoint_state().items()):
            h.update(k.encode())
            h.update(v.float().numpy().tobytes())
        return h.hexdigest()[:16]


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "PretrainedModule"]
