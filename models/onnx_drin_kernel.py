"""The DRIN serving kernel through ONNX Runtime: its scores from the entity products on, one graph.

:class:`models.drin_kernel.DrinKernel` runs as eager torch ops. Most of its time at the
server's sizes is matrix products, and on this project's AMD hosts torch's BLAS (MKL) runs
them at ~100 GFLOP/s on one core where onnxruntime's own (MLAS) runs them at 230-245: the
per-candidate ``W_h`` of the last layer ((100, 768) x (768, 768): 1.27 against 0.51 ms) and
the mention-side matrix-vector products, which read ~20 MB of weights per request (2-row
products against (768, 1280) weights: 105 against 46 us hot). ``kernel_runtime = "onnx"``
exports :meth:`DrinKernel.scores` (everything after the first layer's entity products: the
initial edges, the layers, the cosine) once per DRIN model as one ONNX graph; the entity
products themselves are gathered from the KB's folded table (or folded in torch for rows the
table does not cover) and fed to it.

The graph always takes a candidate mask: all true is the torch kernel's unmasked case bit for
bit (the mean's weights 1 / K either way). DRIN itself is unchanged and the graph is traced
from the kernel's own code. Exports are keyed by the model's config and weights, the text
widths, the torch and onnxruntime versions and :data:`DRIN_EXPORT_VERSION`, and checked
against the torch kernel in float64 on random inputs at shapes it was not traced at before
they are kept (tests/test_onnx_drin_kernel.py). CPU and float32 only: elsewhere the torch
kernel runs.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.drin_features import DrinEntityParts, DrinMentionParts, DrinReranker
from models.drin_kernel import DrinKernel
from models.onnx_encoders import OPSET, OnnxRuntimeError
from models.onnx_kernel import _session, digest

logger = logging.getLogger(__name__)

# Bump when the graph changes meaning (inputs, outputs, formulation).
DRIN_EXPORT_VERSION = 2
DRIN_KERNEL_FILE = "drin_kernel.onnx"
# The export check: the graph's scores and edges against the torch kernel in float64 (scores
# are cosines, edges weights in [0, 1]): float32 rounding is ~1e-7..1e-6 there.
EXPORT_CHECK_ATOL = 1e-5
_MENTION = ("span_text", "text", "image", "regions", "region_scores")
_ENTITY = ("text", "image", "region", "region_score")
_FOLDED = ("h_et", "h_ei", "aligned")
_INPUTS = (*(f"m_{n}" for n in _MENTION), *(f"e_{n}" for n in _ENTITY), *_FOLDED, "mask")
_OUTPUTS = ("scores", "edges")


class _DrinGraph(nn.Module):
    """:meth:`DrinKernel.scores` as one traceable forward (the folded matrices as constants)."""

    def __init__(self, kernel: DrinKernel) -> None:
        super().__init__()
        self.kernel = kernel
        self.reranker = kernel.reranker  # registered: the traced graph holds its weights

    def forward(self, *x: Tensor) -> tuple[Tensor, Tensor]:
        m = DrinMentionParts(*x[:5])
        e = DrinEntityParts(*x[5:9])
        h_et, h_ei, aligned, mask = x[9:]
        return self.kernel.scores(m, e, h_et, h_ei, aligned, mask)


def export_key(reranker: DrinReranker) -> str:
    """Identity of an export: what the graph is a function of."""
    import onnxruntime as ort

    ident = {
        "v": DRIN_EXPORT_VERSION,
        "opset": OPSET,
        "config": reranker.config.to_dict(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    return digest(ident, reranker)


def _example(
    kernel: DrinKernel, b: int, k: int, seed: int
) -> tuple[DrinMentionParts, DrinEntityParts, Tensor]:
    """Random parts in the model's widths (some candidates without an image, as the store's
    image record 0), and a mask with the last candidate of the first mention off."""
    cfg = kernel.reranker.config
    dt, dg, dr = cfg.drin.text_dim, cfg.drin.image_dim, cfg.region_dim
    g = torch.Generator().manual_seed(seed)

    def r(*s: int) -> Tensor:
        return torch.randn(*s, generator=g)

    m = DrinMentionParts(
        r(b, dt),
        r(b, dt),
        r(b, dg),
        F.normalize(r(b, 3, dr), dim=-1),
        torch.rand(b, 3, generator=g),
    )
    score = torch.rand(b, k, 1, generator=g)
    score[:, ::3] = 0.0  # imageless candidates
    e = DrinEntityParts(r(b, k, dt), r(b, k, dg), F.normalize(r(b, k, dr), dim=-1), score)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[0, -1] = False
    return m, e, mask


def _feeds(
    m: DrinMentionParts,
    e: DrinEntityParts,
    folded: tuple[Tensor, Tensor, Tensor],
    mask: Tensor,
    wanted: frozenset[str],
) -> dict[str, np.ndarray]:
    """The graph's inputs, of those it reads (``wanted``: a one-layer graph never reads the
    entity images, and the export drops an input nothing reads)."""

    def arr(t: Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().numpy())

    values = _feeds_tensors(m, e, folded, mask)
    return {n: arr(v) for n, v in zip(_INPUTS, values, strict=True) if n in wanted}


def _input_names(session: Any) -> frozenset[str]:
    return frozenset(i.name for i in session.get_inputs())


@torch.inference_mode(False)
def ensure_drin_export(reranker: DrinReranker, cache_dir: str | os.PathLike[str]) -> Path:
    """The DRIN kernel graph of this model, exported into ``cache_dir/drin-<key>/`` the first
    time (a few seconds) and checked against the torch kernel in float64; reused after."""
    folder = Path(cache_dir) / f"drin-{export_key(reranker)}"
    path = folder / DRIN_KERNEL_FILE
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cpu = copy.deepcopy(reranker).to("cpu", torch.float32).eval()
    kernel = DrinKernel(cpu)
    exact = DrinKernel(copy.deepcopy(cpu).double())
    m, e, mask = _example(kernel, 2, 3, seed=0)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic
        folded = kernel.entity_products(e)
        dynamic: dict[str, dict[int, str]] = {f"m_{n}": {0: "B"} for n in _MENTION}
        for n in (*(f"e_{n}" for n in _ENTITY), *_FOLDED, "mask"):
            dynamic[n] = {0: "B", 1: "K"}
        torch.onnx.export(
            _DrinGraph(kernel).eval(),
            tuple(_feeds_tensors(m, e, folded, mask)),
            str(tmp),
            input_names=list(_INPUTS),
            output_names=list(_OUTPUTS),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    sess = _session(tmp, 1)
    for b, k, all_valid in ((1, 7, True), (3, 5, False), (2, 11, True)):
        m2, e2, mask2 = _example(kernel, b, k, seed=b * 10 + k)
        if all_valid:
            mask2 = torch.ones_like(mask2)
        with torch.inference_mode():
            f32 = kernel.entity_products(e2)
            m64, e64 = m2.map(torch.Tensor.double), e2.map(torch.Tensor.double)
            want = exact.scores(m64, e64, *exact.entity_products(e64), mask2)
        got = sess.run(None, _feeds(m2, e2, f32, mask2, _input_names(sess)))
        err = 0.0
        for g_, w_ in zip(got, want, strict=True):
            w = w_.numpy()
            finite = np.isfinite(w)  # masked candidates score -inf on both sides
            if not (np.isfinite(g_) == finite).all():
                err = float("inf")
                break
            err = max(err, float(np.abs(g_[finite] - w[finite]).max()))
        if not err <= EXPORT_CHECK_ATOL:
            tmp.unlink(missing_ok=True)
            raise OnnxRuntimeError(
                f"the exported DRIN kernel differs from the kernel in float64 by {err:.1e} at "
                f"B={b}, K={k} (> {EXPORT_CHECK_ATOL}); not cached"
            )
    tmp.replace(path)
    logger.info("exported the DRIN kernel to %s in %.1fs", path, time.perf_counter() - t0)
    return path


def _feeds_tensors(
    m: DrinMentionParts, e: DrinEntityParts, folded: tuple[Tensor, Tensor, Tensor], mask: Tensor
) -> list[Tensor]:
    return [*(getattr(m, n) for n in _MENTION), *(getattr(e, n) for n in _ENTITY), *folded, mask]


class OnnxDrinKernel(DrinKernel):
    """:class:`DrinKernel` with :meth:`DrinKernel.scores` run by onnxruntime: the entity
    products are gathered from the table (or folded in torch) as before, the rest is the
    exported graph. Thread-safe (model workers share the session)."""

    runtime = "onnx"

    def __init__(self, reranker: DrinReranker, path: str | os.PathLike[str], threads: int) -> None:
        super().__init__(reranker)
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.inputs = _input_names(self.session)
        self._export_stamp = self._stamp  # the weights the graph holds

    def scores(
        self,
        m: DrinMentionParts,
        e: DrinEntityParts,
        h_et: Tensor,
        h_ei: Tensor,
        aligned: Tensor,
        candidate_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if self._stamp != self._export_stamp:  # refolded for changed weights: not the graph's
            logger.warning("the DRIN weights changed after the export: the torch kernel scores")
            return super().scores(m, e, h_et, h_ei, aligned, candidate_mask)
        mask = (
            candidate_mask
            if candidate_mask is not None
            else torch.ones(e.text.shape[:2], dtype=torch.bool, device=e.text.device)
        )
        out = self.session.run(None, _feeds(m, e, (h_et, h_ei, aligned), mask, self.inputs))
        return torch.from_numpy(out[0]), torch.from_numpy(out[1])


def load_drin_kernel(
    reranker: DrinReranker,
    runtime: str | None,
    cache_dir: str | os.PathLike[str],
    threads: int,
) -> DrinKernel:
    """The DRIN kernel ``runtime`` asks for (as :func:`models.onnx_kernel.load_kernel`: None
    is onnx for a float32 CPU model, torch otherwise; an export that fails its check falls
    back to torch under None and raises when onnx was asked for by name)."""
    kernel = DrinKernel(reranker)
    on_cpu = kernel.dtype == torch.float32 and reranker.align.proj.weight.device.type == "cpu"
    chosen = runtime or ("onnx" if on_cpu else "torch")
    if chosen == "torch":
        return kernel
    if not on_cpu:
        raise ValueError("kernel runtime onnx runs a float32 DRIN model on the CPU")
    try:
        path = ensure_drin_export(reranker, cache_dir)
    except OnnxRuntimeError as exc:
        if runtime is not None:
            raise
        logger.warning("DRIN kernel: %s; serving the torch kernel instead", exc)
        return kernel
    return OnnxDrinKernel(reranker, path, threads)


__all__ = [
    "DRIN_EXPORT_VERSION",
    "OnnxDrinKernel",
    "ensure_drin_export",
    "export_key",
    "load_drin_kernel",
]
