"""The default backbone's towers through ONNX Runtime: exported once, cached, never downloaded.

``encoder_runtime`` selects how the frozen towers of the ``minilm-effnet`` backbone run at
inference time (the index job and the server must use the same one; the index manifest
records it):

``torch``      the PyTorch modules (models/encoders.py; EfficientNet with BatchNorm folded).
``onnx``       both towers exported to ONNX (fp32) and run by onnxruntime.
``onnx-int8``  the same, with the text tower's MatMuls dynamically quantised to int8
               (``onnxruntime.quantization.quantize_dynamic``: int8 weights, activations
               quantised per batch at run time). The image tower stays fp32: dynamic int8
               covers convolutions only as ``ConvInteger``, which measured slower than fp32
               and far off (bench/speed.py), and EfficientNet is all convolutions.

Exports are made from the weights actually loaded (the BatchNorm-folded EfficientNet the
torch path runs, models/encoders.py ``fuse_efficientnet_for_inference``) into a cache folder,
keyed by the backbone's weight fingerprint, the text length, the image size, the torch
version and :data:`EXPORT_VERSION`; a key that changes gets a fresh export, so a stale file is
never reused. Each export is checked against the torch towers on one input before it is kept.
Training never goes through here: with gradients on, the torch modules run.

Provider: ``CUDAExecutionProvider`` when the model is on a CUDA device and onnxruntime offers
it (onnxruntime-gpu), else the CPU provider. Intra-op threads come from models/threads.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.encoders import (
    ImageFeatures,
    MimicEncoder,
    MiniLmEffNetBackbone,
    TextFeatures,
    fuse_efficientnet_for_inference,
)

logger = logging.getLogger(__name__)

ENCODER_RUNTIMES = ("torch", "onnx", "onnx-int8")
# What a backend runs when no runtime is asked for (encoder_runtime None, the default of the
# service setting and of mel-index build), chosen by measurement (bench/speed.py, README
# "Speed"): onnx is faster than torch at the same quality for the default backbone; CLIP has
# no ONNX path here.
BACKEND_RUNTIMES = {"minilm-effnet": "onnx", "clip": "torch"}
# Bump when the exported graphs change meaning (inputs, outputs, folding): old exports then
# get new keys and are not reused.
EXPORT_VERSION = 2  # 2: the text tower's sequence axis is dynamic
OPSET = 17
# The export check: an exported fp32 tower must reproduce the torch tower this closely on one
# input before it is cached (tests/test_onnx_encoders.py holds fp32 to 1e-4 on random inputs).
EXPORT_CHECK_ATOL = 1e-3
ONNX_CACHE_DIR = "onnx"  # default cache: <model folder>/onnx


class OnnxRuntimeError(RuntimeError):
    """The ONNX runtime cannot serve this model (backend, missing package, failed export)."""


def check_runtime(name: str) -> str:
    if name not in ENCODER_RUNTIMES:
        raise ValueError(f"encoder runtime must be one of {ENCODER_RUNTIMES}, got {name!r}")
    return name


def resolve_runtime(runtime: str | None, backend: str) -> str:
    """``runtime`` if given, else the backend's default (:data:`BACKEND_RUNTIMES`)."""
    if runtime is None:
        return BACKEND_RUNTIMES.get(backend, "torch")
    return check_runtime(runtime)


def default_cache_dir(model_folder: str | os.PathLike[str], cache: str | None = None) -> Path:
    """``cache`` (the ``MEL_ONNX_CACHE`` setting / ``--onnx-cache`` flag) if given, else
    ``<model folder>/onnx``."""
    return Path(cache) if cache else Path(model_folder) / ONNX_CACHE_DIR


@dataclass(frozen=True)
class OnnxFiles:
    """The two exported towers of one runtime variant."""

    text: Path
    image: Path


class _TextTower(nn.Module):
    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out: Tensor = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        return out


class _ImageTower(nn.Module):
    def __init__(self, fused: Any) -> None:
        super().__init__()
        self.fused = fused

    def forward(self, pixel_values: Tensor) -> Tensor:
        out: Tensor = self.fused.extract_features(pixel_values)
        return out


def export_key(backbone: MiniLmEffNetBackbone, text_length: int) -> str:
    """Identity of an export: what the graphs are a function of."""
    return hashlib.sha256(
        json.dumps(
            {
                "v": EXPORT_VERSION,
                "opset": OPSET,
                "weights": backbone.weights_fingerprint(),
                "text_length": text_length,
                "image_size": backbone.pixel_size,
                "torch": torch.__version__,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]


def _replace_atomically(tmp: Path, final: Path) -> None:
    tmp.replace(final)  # two processes exporting at once both write whole files; one wins


def _session(path: Path, threads: int, providers: list[str]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Idle ORT workers would otherwise spin on their cores after each run and slow the torch
    # work (MIMIC, DRIN) that follows in the same process.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=providers)


def providers_for(device: torch.device) -> list[str]:
    """CUDA first when the model runs on CUDA and onnxruntime has the provider; else CPU."""
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    names: list[str],
    dynamic: dict[str, dict[int, str]],
) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    inputs, output = names[:-1], names[-1]
    with warnings.catch_warnings():
        # the TorchScript exporter warns about traced python conditionals that are constant
        # for these inputs (e.g. the causal-mask check of a non-causal BERT)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(tmp),
            input_names=inputs,
            output_names=[output],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: 8 s here against ~50 s for dynamo
        )
    _replace_atomically(tmp, path)


def _check(path: Path, feeds: dict[str, np.ndarray], want: Tensor) -> None:
    got = _session(path, 1, ["CPUExecutionProvider"]).run(None, feeds)[0]
    diff = float(np.abs(got - want.numpy()).max())
    if not diff <= EXPORT_CHECK_ATOL:
        path.unlink(missing_ok=True)
        raise OnnxRuntimeError(
            f"the exported {path.name} differs from the torch tower by {diff:.2e} "
            f"(> {EXPORT_CHECK_ATOL}); not cached"
        )


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    quantize_dynamic(
        src,
        tmp,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        # per output channel: pooled-embedding cosine to fp32 0.988-0.992 on demo-world
        # entity texts, against 0.95-0.96 with one scale per tensor
        per_channel=True,
    )
    _replace_atomically(tmp, dst)


@torch.inference_mode(False)
def ensure_exports(
    backbone: MiniLmEffNetBackbone,
    cache_dir: str | os.PathLike[str],
    runtime: str,
    text_length: int,
) -> OnnxFiles:
    """The ONNX files of ``runtime`` for this backbone, exported into ``cache_dir/<key>/`` the
    first time (about 15 s for both towers on 2 cores), reused after."""
    check_runtime(runtime)
    if runtime == "torch":
        raise ValueError("the torch runtime has no ONNX files")
    folder = Path(cache_dir) / export_key(backbone, text_length)
    folder.mkdir(parents=True, exist_ok=True)
    text, image = folder / "text.onnx", folder / "image.onnx"
    t0 = time.perf_counter()
    made = []
    with torch.no_grad():
        if not text.is_file():
            ids = torch.full((2, text_length), 100, dtype=torch.long)
            ids[:, 0] = 101  # [CLS]
            mask = torch.ones_like(ids)
            mask[1, text_length // 2 :] = 0
            tower = _TextTower(backbone.text_model)
            names = ["input_ids", "attention_mask", "tokens"]
            # batch and sequence both free: the surface features pad only to the longest text
            _export(
                tower, (ids, mask), text, names, {n: {0: "batch", 1: "sequence"} for n in names}
            )
            for cut in (text_length, 5):  # the traced length and a shorter one
                _check(
                    text,
                    {"input_ids": ids[:, :cut].numpy(), "attention_mask": mask[:, :cut].numpy()},
                    tower(ids[:, :cut], mask[:, :cut]),
                )
            made.append(text.name)
        if not image.is_file():
            fused = fuse_efficientnet_for_inference(backbone.image_model).to(
                memory_format=torch.contiguous_format
            )
            size = backbone.pixel_size
            x = torch.zeros(1, 3, size, size)
            itower = _ImageTower(fused)
            inames = ["pixel_values", "feature_map"]
            _export(itower, (x,), image, inames, {n: {0: "batch"} for n in inames})
            _check(image, {"pixel_values": x.numpy()}, itower(x))
            made.append(image.name)
    if runtime == "onnx-int8":
        text_q = folder / "text.int8.onnx"
        if not text_q.is_file():
            _quantize(text, text_q)
            made.append(text_q.name)
        text = text_q
    if made:
        logger.info("exported %s to %s in %.1fs", ", ".join(made), folder, time.perf_counter() - t0)
    return OnnxFiles(text=text, image=image)


class OnnxMiniLmEffNetBackbone(MiniLmEffNetBackbone):
    """The ``minilm-effnet`` backbone whose inference runs through onnxruntime sessions.

    It holds the same torch modules (so its weights, state dict and fingerprint are those of
    the backbone it wraps) and runs them whenever gradients are on (training); under
    ``torch.no_grad`` / ``inference_mode`` the exported towers run instead.
    """

    def __init__(
        self,
        backbone: MiniLmEffNetBackbone,
        files: OnnxFiles,
        runtime: str,
        threads: int,
        providers: list[str],
    ) -> None:
        super().__init__(
            backbone.text_model,
            backbone.tokenizer.tokenizer,
            backbone.image_model,
            backbone.tokenizer.max_length,
            backbone.pixel_size,
            source=backbone.source,
        )
        self.runtime = check_runtime(runtime)
        self.files = files
        self.threads = threads
        self.providers = providers
        self._text = _session(files.text, threads, providers)
        self._image = _session(files.image, threads, providers)

    def _torch_path(self) -> bool:
        return self.training or torch.is_grad_enabled()

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        if self._torch_path():
            return super().encode_text(input_ids, attention_mask)
        out = self._text.run(
            None,
            {
                "input_ids": input_ids.cpu().numpy().astype(np.int64),
                "attention_mask": attention_mask.cpu().numpy().astype(np.int64),
            },
        )[0]
        tokens = torch.from_numpy(out).to(input_ids.device)
        return self.pool_text(tokens, attention_mask)

    def encode_pixels(self, pixel_values: Tensor) -> ImageFeatures:
        if self._torch_path():
            return super().encode_pixels(pixel_values)
        fmap = self._image.run(
            None, {"pixel_values": pixel_values.float().cpu().contiguous().numpy()}
        )[0]
        return self.map_features(torch.from_numpy(fmap).to(pixel_values.device))


def runtime_of(encoder: MimicEncoder) -> str:
    """The encoder runtime an encoder runs (``torch`` unless :func:`use_runtime` changed it)."""
    return str(getattr(encoder.backbone, "runtime", "torch"))


def use_runtime(
    encoder: MimicEncoder,
    runtime: str,
    cache_dir: str | os.PathLike[str],
    threads: int,
    device: torch.device | None = None,
) -> None:
    """Switch ``encoder``'s backbone to ``runtime`` (exporting it on first use). ``torch`` on a
    torch backbone is a no-op."""
    check_runtime(runtime)
    if runtime == runtime_of(encoder):
        return
    bb = encoder.backbone
    if isinstance(bb, OnnxMiniLmEffNetBackbone):  # back to the modules it wraps
        bb = MiniLmEffNetBackbone(
            bb.text_model,
            bb.tokenizer.tokenizer,
            bb.image_model,
            bb.tokenizer.max_length,
            bb.pixel_size,
            bb.source,
        )
    if runtime != "torch":
        if type(bb) is not MiniLmEffNetBackbone:
            raise OnnxRuntimeError(
                f"encoder runtime {runtime!r} supports the minilm-effnet backend only, not "
                f"{type(bb).__name__}; use encoder_runtime=torch"
            )
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise OnnxRuntimeError(
                f"encoder runtime {runtime!r} needs the onnxruntime package"
            ) from exc
        files = ensure_exports(bb, cache_dir, runtime, encoder.config.text_max_length)
        device = device if device is not None else encoder.image_cls_fc.weight.device
        bb = OnnxMiniLmEffNetBackbone(bb, files, runtime, threads, providers_for(device))
    encoder.backbone = bb
    encoder.train(encoder.training)  # drops the cached no-image features of the old runtime


__all__ = [
    "BACKEND_RUNTIMES",
    "ENCODER_RUNTIMES",
    "EXPORT_VERSION",
    "OnnxFiles",
    "OnnxMiniLmEffNetBackbone",
    "OnnxRuntimeError",
    "check_runtime",
    "default_cache_dir",
    "ensure_exports",
    "export_key",
    "providers_for",
    "resolve_runtime",
    "runtime_of",
    "use_runtime",
]
