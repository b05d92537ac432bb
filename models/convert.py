"""Convert a released MIMIC Lightning checkpoint into our checkpoint folder.

    mel-convert-mimic --ckpt wikimel.ckpt --clip openai-clip-vit-base-patch32/ --out ckpt/

The released ``.ckpt`` holds ``state_dict`` with ``encoder.clip.<CLIPModel keys>`` (the CLIP
weights as fine-tuned by MIMIC training), ``encoder.image_cls_fc.*``, ``encoder.image_tokens_fc.*``
and ``matcher.*``. The CLIP folder given with ``--clip`` supplies the config, tokenizer and image
processor (the weights in the .ckpt replace its weights). Dimensions (dt, dv, unit widths) are
read off the weights. The result scores exactly as the released model does.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
from typing import Any

import torch

from models.encoders import ClipBackbone, EncoderConfig
from models.mimic import MimicConfig
from models.model import LinkingModel, LinkingModelConfig

logger = logging.getLogger(__name__)

_SAFE_MODULE_PREFIXES = ("torch", "collections", "numpy", "builtins", "_codecs", "copyreg")


class _Stub:
    """Stands in for any class a checkpoint pickles besides tensors (OmegaConf, argparse...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in _SAFE_MODULE_PREFIXES and not (
            module == "builtins"
            and name in {"eval", "exec", "getattr", "__import__", "compile", "open"}
        ):
            return super().find_class(module, name)
        return type(name, (_Stub,), {})


class _StubPickleModule:
    Unpickler = _StubUnpickler
    load = pickle.load
    loads = pickle.loads


def load_lightning_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (or a bare state dict file).

    Tries the safe ``weights_only`` loader first; a checkpoint whose hyper-parameters pickle
    other classes is read with those classes replaced by inert stubs (nothing is executed).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_StubPickleModule
        )
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("matcher.") for k in state):
        raise ValueError(f"{path}: no MIMIC state_dict (expected matcher.* keys)")
    return state


def config_from_state(state: dict[str, torch.Tensor]) -> MimicConfig:
    """Read the matcher's dimensions off its weights."""
    return MimicConfig(
        dt=int(state["matcher.text_cls_layernorm.weight"].shape[0]),
        dv=int(state["matcher.image_cls_layernorm.weight"].shape[0]),
        tglu_hidden_dim=int(state["matcher.tglu.fc_query.weight"].shape[0]),
        idlu_hidden_dim=int(state["matcher.vdlu.dual_ent2men.cls_fc.weight"].shape[0]),
        cmfu_hidden_dim=int(state["matcher.cmfu.text_fc.weight"].shape[0]),
    )


def convert_official_checkpoint(
    ckpt: str | os.PathLike[str],
    clip_folder: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    text_max_length: int = 40,
) -> LinkingModel:
    """Build our LinkingModel from a released checkpoint (and save it to ``out`` if given)."""
    state = load_lightning_state_dict(ckpt)
    mimic = config_from_state(state)
    backbone = ClipBackbone.from_folder(clip_folder, text_max_length)
    enc = EncoderConfig(backend="clip", dv=mimic.dv, text_max_length=text_max_length)
    model = LinkingModel(LinkingModelConfig(enc, mimic), backbone)
    mapped: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("encoder.clip."):
            mapped["encoder.backbone.clip." + k[len("encoder.clip.") :]] = v
        elif k.startswith(("encoder.image_cls_fc.", "encoder.image_tokens_fc.", "matcher.")):
            mapped[k] = v
        else:
            logger.info("ignoring checkpoint key %s", k)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    # position_ids buffers are not saved by every transformers version
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit: missing={missing[:8]} unexpected={unexpected[:8]}"
        )
    model.eval()
    if out is not None:
        model.save_pretrained(out, meta={"converted_from": str(ckpt)})
    return model


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    p = argparse.ArgumentParser(
        prog="mel-convert-mimic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="released Lightning .ckpt")
    p.add_argument(
        "--clip", required=True, help="local CLIPModel folder (config, tokenizer, image processor)"
    )
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--text-max-length", type=int, default=40)
    a = p.parse_args(argv)
    model = convert_official_checkpoint(a.ckpt, a.clip, a.out, a.text_max_length)
    print(f"wrote {a.out} (fingerprint {model.fingerprint()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
