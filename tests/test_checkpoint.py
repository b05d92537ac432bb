"""The checkpoint base (models/checkpoint.py): fingerprints stay what indexes were built with.

Index manifests and the server's caches are keyed on ``fingerprint()``, so its bytes are
pinned here against the formulas LinkingModel and DrinReranker each carried before they
shared one base (written out inline below), and checkpoints written the old way must load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from models.drin import DrinConfig
from models.drin_features import DrinReranker, DrinRerankerConfig
from models.encoders import ClipBackbone, MiniLmEffNetBackbone
from models.model import LinkingModel
from tests.reference_mimic import randomise_layernorms

META = {"epoch": 3, "val": {"MRR": 0.5}, "note": "Zoë"}


# ------------------------------------------------------------ the formulas before the base
def _linking_state_before(model: LinkingModel) -> dict[str, torch.Tensor]:
    """``LinkingModel.trainable_state`` as it was."""
    keep_backbone = model.config.encoder.backbone_in_checkpoint and not isinstance(
        model.encoder.backbone, ClipBackbone
    )
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if keep_backbone or not k.startswith("encoder.backbone.")
    }


def _linking_fingerprint_before(model: LinkingModel) -> str:
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    h.update(model.encoder.backbone.weights_fingerprint().encode())
    for k, v in sorted(_linking_state_before(model).items()):
        h.update(k.encode())
        h.update(v.float().numpy().tobytes())
    return h.hexdigest()[:16]


def _linking_doc_before(model: LinkingModel, meta: dict[str, Any]) -> str:
    doc = {
        "format": "mel-model",
        "version": 1,
        **model.config.to_dict(),
        "backbone_weights": model.encoder.backbone.weights_fingerprint(),
        "meta": meta,
    }
    return json.dumps(doc, indent=1)


def _drin_fingerprint_before(drin: DrinReranker) -> str:
    h = hashlib.sha256(json.dumps(drin.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(drin.state_dict().items()):
        h.update(k.encode())
        h.update(v.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _drin_doc_before(drin: DrinReranker, meta: dict[str, Any]) -> str:
    doc = {"format": "mel-drin", "version": 1, **drin.config.to_dict(), "meta": meta}
    return json.dumps(doc, indent=1)


def _write_before(folder: Path, state: dict[str, torch.Tensor], doc: str) -> Path:
    """A checkpoint folder as the code before the base wrote it."""
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(doc, encoding="utf-8")
    return folder


# ------------------------------------------------------------ models
def _clip_model(tiny_clip_dir: Path) -> LinkingModel:
    torch.manual_seed(0)
    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    randomise_layernorms(model.matcher)
    return model.eval()


@pytest.fixture(scope="module")
def minilm_backbone() -> MiniLmEffNetBackbone:
    return MiniLmEffNetBackbone.from_packages()


def _minilm_model(backbone: MiniLmEffNetBackbone, in_checkpoint: bool) -> LinkingModel:
    torch.manual_seed(1)
    model = LinkingModel.for_backbone(backbone, dv=8, hidden=12)
    if in_checkpoint:  # what mel-train --mode full saves
        enc = dataclasses.replace(model.config.encoder, backbone_in_checkpoint=True)
        model.config = dataclasses.replace(model.config, encoder=enc)
        model.encoder.config = enc
    return model.eval()


def _drin(alignment: str) -> DrinReranker:
    torch.manual_seed(2)
    dt = dg = 6
    drin = DrinReranker(
        DrinRerankerConfig(DrinConfig(dt, dg, hidden=8), "minilm-effnet", 4, alignment)
    )
    gen = torch.Generator().manual_seed(3)
    drin.align.fit(torch.randn(20, dg, generator=gen), torch.randn(20, dt, generator=gen))
    return drin.eval()


# ------------------------------------------------------------ tests
def test_linking_fingerprint_and_files_as_before(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model = _clip_model(tiny_clip_dir)
    assert model.fingerprint() == _linking_fingerprint_before(model)
    folder = model.save_pretrained(tmp_path / "new", meta=META)
    assert (folder / "config.json").read_text(encoding="utf-8") == _linking_doc_before(model, META)
    old = tmp_path / "old.safetensors"
    save_file(_linking_state_before(model), str(old))
    assert (folder / "model.safetensors").read_bytes() == old.read_bytes()
    assert not list(folder.glob("*.tmp"))
    loaded = LinkingModel.from_pretrained(folder)
    assert loaded.fingerprint() == model.fingerprint() and loaded.meta == META


@pytest.mark.parametrize("in_checkpoint", [False, True])
def test_linking_fingerprint_with_the_packaged_backbone(
    minilm_backbone: MiniLmEffNetBackbone, in_checkpoint: bool, tmp_path: Path
) -> None:
    model = _minilm_model(minilm_backbone, in_checkpoint)
    assert model.fingerprint() == _linking_fingerprint_before(model)
    stored = model.checkpoint_state()
    assert any(k.startswith("encoder.backbone.") for k in stored) == in_checkpoint
    # a checkpoint written by the code before the base loads, with the same identity
    folder = _write_before(
        tmp_path / "old", _linking_state_before(model), _linking_doc_before(model, META)
    )
    loaded = LinkingModel.from_pretrained(folder)
    assert loaded.fingerprint() == model.fingerprint() and loaded.meta == META


def test_clip_checkpoint_written_before_loads(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model = _clip_model(tiny_clip_dir)
    folder = _write_before(
        tmp_path / "old", _linking_state_before(model), _linking_doc_before(model, META)
    )
    model.encoder.backbone.save_source(folder / "backbone")
    loaded = LinkingModel.from_pretrained(folder)
    assert loaded.fingerprint() == model.fingerprint()


@pytest.mark.parametrize("alignment", ["ridge", "native"])
def test_drin_fingerprint_and_files_as_before(alignment: str, tmp_path: Path) -> None:
    drin = _drin(alignment)
    assert drin.fingerprint() == _drin_fingerprint_before(drin)
    folder = drin.save_pretrained(tmp_path / "new", meta=META)
    assert (folder / "config.json").read_text(encoding="utf-8") == _drin_doc_before(drin, META)
    old = _write_before(
        tmp_path / "old",
        {k: v.detach().cpu().contiguous() for k, v in drin.state_dict().items()},
        _drin_doc_before(drin, META),
    )
    assert (folder / "model.safetensors").read_bytes() == (old / "model.safetensors").read_bytes()
    for f in (folder, old):
        loaded = DrinReranker.from_pretrained(f)
        assert loaded.fingerprint() == drin.fingerprint() and loaded.meta == META
        assert int(loaded.align.pairs) == (20 if alignment == "ridge" else 0)


def test_checkpoint_format_is_checked(tiny_clip_dir: Path, tmp_path: Path) -> None:
    drin = _drin("ridge").save_pretrained(tmp_path / "drin")
    with pytest.raises(ValueError, match="mel-model"):
        LinkingModel.from_pretrained(drin)
    with pytest.raises(FileNotFoundError, match="DRIN checkpoint"):
        DrinReranker.from_pretrained(tmp_path / "nothing")
    doc = json.loads((drin / "config.json").read_text())
    (drin / "config.json").write_text(json.dumps({**doc, "version": 2}))
    with pytest.raises(ValueError, match="v<=1"):
        DrinReranker.from_pretrained(drin)


def test_a_checkpoint_that_does_not_fit_is_refused(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model = _clip_model(tiny_clip_dir)
    folder = model.save_pretrained(tmp_path / "m")
    state = _linking_state_before(model)
    state.pop(next(k for k in state if k.startswith("matcher.")))
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        LinkingModel.from_pretrained(folder)
