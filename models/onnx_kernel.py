"""The serving kernel through ONNX Runtime: MIMIC over per-mention candidate lists, one graph.

:func:`models.rerank_kernel.score_candidates` runs the kernel as eager torch ops. At the
server's usual sizes (1-32 mentions x 100 candidates) much of its time is per-op overhead:
about 60 small ops (LayerNorms, the VDLU and CMFU products) around one large attention GEMM.
``kernel_runtime = "onnx"`` exports the same computation once per matcher as one ONNX graph
and runs it with onnxruntime, which runs small ops with less overhead and a faster softmax
(bench/speed.py, "MIMIC over B x K candidates"):

* the same formulation as the torch kernel: one attention GEMM per mention for all its
  candidates (its K candidates' queries as one (K L, h) matrix against its (h, L) keys), the
  mean of the softmax rows, then times V (the released order); no candidate blocks (a graph
  has no cheap loop; the measured cost of the block slices outweighed their cache gain);
* the three VDLU record fields may have one candidate instead of K (``KI`` = 1 in the graph):
  when no candidate of the batch has an image they are all the store's no-image record, so
  VDLU is one pair per mention, broadcast to the list, as the torch kernel does.

* the records as the store holds them (``codecs``, the store's ``field_codecs``): float16
  fields cast to float32 and ``q8`` fields (int8 + a float16 scale per last-axis row) decoded
  inside the graph, by the very products ``index.store.StoredField.take`` computes in numpy
  (so the same float32 records and bit-identical scores); the store read is then a gather of
  the stored bytes, and the kernel reads a quarter of the bytes. A second graph, without
  ``codecs``, scores float32 records (rows added live, which are not coded).

MIMIC itself (models/mimic.py) is unchanged and the graph is traced from its own modules.
Exports are keyed by the matcher's config and weights, the text length, the torch and
onnxruntime versions and :data:`KERNEL_EXPORT_VERSION`, and checked against the torch kernel
on random inputs before they are kept (tests/test_onnx_kernel.py holds them to the torch
kernel's own tolerance against ``score_precomputed``). CPU only: on a CUDA device the torch
kernel runs (the CUDA provider is unmeasured here).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from models.mimic import MimicEntityRecord, MimicFeatures, MimicMatcher, MimicScores
from models.onnx_encoders import OPSET, OnnxRuntimeError
from models.rerank_kernel import score_candidates

logger = logging.getLogger(__name__)

KERNEL_RUNTIMES = ("torch", "onnx")
# Bump when the graph changes meaning (inputs, outputs, formulation).
KERNEL_EXPORT_VERSION = 1
KERNEL_FILE = "mimic_kernel.onnx"
# The export check: the graph's outputs against the torch kernel run in float64, relative to
# the largest |score|. fp32 rounding puts either float32 kernel ~1e-7..1e-6 from float64 on the
# check's random inputs (a WikiMEL model: 2.5e-7..9.3e-7 for torch, up to 1.1e-6 for the
# graph, so 1e-6 against the float32 torch kernel refused a correct export); a wrong graph is
# off by orders of magnitude more.
EXPORT_CHECK_RTOL = 1e-5
_MENTION = ("text_cls", "text_tokens", "image_cls", "image_tokens")
_RECORD = MimicEntityRecord.field_names()
# VDLU's entity fields: one no-image record may stand for the whole list
_IMAGE_FIELDS = ("e2m_query", "m2e_key", "m2e_pooled")
_OUTPUTS = ("score", "tglu", "vdlu", "cmfu")
# how the store holds a record field (index.store.CODECS): float16, or int8 + a float16 scale
# per last-axis row
STORED_CODECS = ("f16", "q8")
Codecs = Mapping[str, str]
# a record field as stored: its values (B, K, ...) and, for q8, its scales (B, K, ...[:-1])
StoredRecords = Mapping[str, tuple[np.ndarray, np.ndarray | None]]


class MimicKernel(Protocol):
    """Scores (B, K) of B mentions against their own K candidates' records."""

    runtime: str
    # the store codecs (per record field) of the records score_stored takes at no decode
    # cost, or None: give it float32 records (__call__)
    codecs: dict[str, str] | None

    def __call__(
        self, mentions: MimicFeatures, records: MimicEntityRecord, no_image: Tensor | None
    ) -> MimicScores: ...

    def score_stored(
        self, mentions: MimicFeatures, stored: StoredRecords, no_image: Tensor | None
    ) -> MimicScores: ...


class TorchKernel:
    """:func:`models.rerank_kernel.score_candidates` (eager torch; also the CUDA path)."""

    runtime = "torch"
    codecs: dict[str, str] | None = None

    def __init__(self, matcher: MimicMatcher) -> None:
        self.matcher = matcher

    def score_stored(
        self, mentions: MimicFeatures, stored: StoredRecords, no_image: Tensor | None
    ) -> MimicScores:
        device = mentions.text_cls.device
        records = _decoded(stored).map(lambda t: t.to(device))
        return score_candidates(self.matcher, mentions, records, no_image=no_image)

    def __call__(
        self, mentions: MimicFeatures, records: MimicEntityRecord, no_image: Tensor | None
    ) -> MimicScores:
        return score_candidates(self.matcher, mentions, records, no_image=no_image)


def record_inputs(codecs: Codecs | None) -> list[str]:
    """The graph's record inputs, in order: ``e_<field>``, and ``e_<field>_scale`` after a
    ``q8`` field's values."""
    names = []
    for n in _RECORD:
        names.append(f"e_{n}")
        if codecs is not None and codecs.get(n) == "q8":
            names.append(f"e_{n}_scale")
    return names


def _decode(value: Tensor, scale: Tensor | None) -> Tensor:
    """A stored field as float32: ``StoredField.take``'s arithmetic (cast, then times the
    row's scale cast to float32), so the graph sees the very records the numpy read gives."""
    out = value.to(torch.float32)
    return out if scale is None else out * scale.to(torch.float32).unsqueeze(-1)


class _KernelGraph(nn.Module):
    """``score_candidates`` without candidate blocks, as one traceable forward; with
    ``codecs``, over the records as stored (decoded first, :func:`_decode`)."""

    def __init__(self, matcher: MimicMatcher, codecs: Codecs | None = None) -> None:
        super().__init__()
        self.matcher = matcher
        self.codecs = codecs

    def _records(self, inputs: Sequence[Tensor]) -> MimicEntityRecord:
        if self.codecs is None:
            return MimicEntityRecord(*inputs)
        it = iter(inputs)
        return MimicEntityRecord(
            *(_decode(next(it), next(it) if self.codecs.get(n) == "q8" else None) for n in _RECORD)
        )

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        m = self.matcher
        men = m._normalise(MimicFeatures(*inputs[:4]))
        rec = self._records(inputs[4:])
        t = m.tglu
        key = t.fc_key(men.text_tokens)  # (B, L, h)
        value = t.fc_value(men.text_tokens)  # (B, L, h)
        key_t = (key * (1.0 / math.sqrt(t.hidden))).transpose(1, 2)  # (B, h, L)
        b, k, length, h = rec.tglu_query.shape
        att = torch.matmul(rec.tglu_query.reshape(b, k * length, h), key_t)  # (B, K L, L)
        pbar = att.softmax(dim=-1).reshape(b, k, length, length).mean(dim=-2)  # (B, K, L)
        ctx = t.layer_norm(torch.matmul(pbar, value))  # (B, K, h)
        g2l = (ctx * rec.tglu_cls).sum(-1)
        g2g = (men.text_cls.unsqueeze(1) * rec.text_cls).sum(-1)
        s_t = (g2l + g2g) / 2
        s_v = m.vdlu.score(
            men.image_cls, men.image_tokens, rec.e2m_query, rec.m2e_key, rec.m2e_pooled, False
        ).expand_as(s_t)  # (B, K) or (B, 1) -> (B, K)
        h_m = m.cmfu.fuse(men.text_cls, men.image_tokens)  # (B, d)
        s_c = (h_m.unsqueeze(1) * rec.cmfu).sum(-1)
        s = m._combine(s_t, s_v, s_c, None)
        return s.score, s.tglu, s.vdlu, s.cmfu


def export_key(matcher: MimicMatcher, codecs: Codecs | None = None) -> str:
    """Identity of an export: what the graph is a function of."""
    import onnxruntime as ort

    ident: dict[str, Any] = {
        "v": KERNEL_EXPORT_VERSION,
        "opset": OPSET,
        "config": repr(matcher.config),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    if codecs is not None:  # absent for the float32 graph: its keys stay what they were
        ident["codecs"] = {n: codecs[n] for n in _RECORD}
    return digest(ident, matcher)


def digest(ident: dict[str, Any], module: nn.Module) -> str:
    """16 hex digits of ``ident`` (JSON) and every tensor of ``module``'s state, as float32:
    an export's cache key."""
    h = hashlib.sha256()
    h.update(json.dumps(ident, sort_keys=True).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _example(
    matcher: MimicMatcher, b: int, k: int, text_length: int, image_tokens: int, seed: int
) -> tuple[MimicFeatures, MimicEntityRecord]:
    """Random mentions and the records of random entities (through the matcher's own
    ``precompute_entities``, so the records have the stored fields' shapes and scales)."""
    cfg = matcher.config
    g = torch.Generator().manual_seed(seed)

    def feats(*lead: int) -> MimicFeatures:
        def r(*s: int) -> Tensor:
            return torch.randn(*lead, *s, generator=g)

        return MimicFeatures(r(cfg.dt), r(text_length, cfg.dt), r(cfg.dv), r(image_tokens, cfg.dv))

    with torch.inference_mode():
        rec = matcher.precompute_entities(feats(b, k)).map(Tensor.clone)
    return feats(b), rec


def _array(t: Tensor) -> np.ndarray:
    if (
        t.dtype is torch.float32
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not t.requires_grad
    ):
        return t.numpy()  # the served case: a view, no dispatch (11 fields: ~20 us saved)
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def _feeds(mentions: MimicFeatures, records: MimicEntityRecord, one_image: bool) -> dict:
    feeds = {f"m_{n}": _array(getattr(mentions, n)) for n in _MENTION}
    for n in _RECORD:
        t = getattr(records, n)
        feeds[f"e_{n}"] = _array(t[:, :1] if one_image and n in _IMAGE_FIELDS else t)
    return feeds


def _stored_feeds(mentions: MimicFeatures, stored: StoredRecords, one_image: bool) -> dict:
    feeds = {f"m_{n}": _array(getattr(mentions, n)) for n in _MENTION}
    for n in _RECORD:
        value, scale = stored[n]
        one = one_image and n in _IMAGE_FIELDS
        feeds[f"e_{n}"] = value[:, :1] if one else value
        if scale is not None:
            feeds[f"e_{n}_scale"] = scale[:, :1] if one else scale
    return feeds


def _check_codecs(codecs: Codecs) -> dict[str, str]:
    bad = {n: codecs.get(n) for n in _RECORD if codecs.get(n) not in STORED_CODECS}
    if bad:
        raise ValueError(
            f"a stored-records kernel needs each record field's codec, one of {STORED_CODECS}; "
            f"got {bad}"
        )
    return {n: codecs[n] for n in _RECORD}


def _code(t: Tensor, codec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A float32 record field coded as the store codes it (``index.store.encode_rows``):
    for the export check's examples."""
    x = t.detach().to(torch.float32).numpy()
    if codec == "f16":
        return x.astype(np.float16), None
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16)
    s32 = scale.astype(np.float32)[..., None]
    q = np.divide(x, s32, out=np.zeros_like(x), where=s32 > 0)
    return np.clip(np.rint(q), -127, 127).astype(np.int8), scale


def _decoded(stored: StoredRecords) -> MimicEntityRecord:
    """Stored records as the float32 records the store read gives (numpy, as the store)."""

    def one(value: np.ndarray, scale: np.ndarray | None) -> Tensor:
        out = value.astype(np.float32)
        if scale is not None:
            out *= scale.astype(np.float32)[..., None]
        return torch.from_numpy(out)

    return MimicEntityRecord(*(one(*stored[n]) for n in _RECORD))


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The transformer fusion that turns VDLU's LayerNorm(p + a) into SkipLayerNormalization
    # ran 7x slower than the plain LayerNorm on (1000, 96) here (onnxruntime's profiler).
    return ort.InferenceSession(
        str(path),
        so,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["SkipLayerNormFusion"],
    )


def _max_rel_error(got: Sequence[np.ndarray], want: MimicScores) -> float:
    """The largest |got - want| over the outputs, relative to the output's largest |value|
    (at least 1), in float64."""
    worst = 0.0
    for g, n in zip(got, _OUTPUTS, strict=True):
        ref = getattr(want, n).double().numpy()
        diff = np.abs(np.asarray(g, dtype=np.float64) - ref).max()
        worst = max(worst, float(diff) / max(1.0, float(np.abs(ref).max())))
    return worst


def _stored(
    records: MimicEntityRecord, codecs: Codecs
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    return {n: _code(getattr(records, n), codecs[n]) for n in _RECORD}


@torch.inference_mode(False)
def ensure_kernel_export(
    matcher: MimicMatcher, cache_dir: str | os.PathLike[str], codecs: Codecs | None = None
) -> Path:
    """The kernel graph of this matcher, exported into ``cache_dir/kernel-<key>/`` the first
    time (about 1 s) and checked against the torch kernel; reused after. ``codecs`` (each
    record field's store codec): the graph over records as stored, decoded inside it."""
    if codecs is not None:
        codecs = _check_codecs(codecs)
    folder = Path(cache_dir) / f"kernel-{export_key(matcher, codecs)}"
    path = folder / KERNEL_FILE
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cpu = copy.deepcopy(matcher).to("cpu", torch.float32).eval()  # the served matcher's form
    exact = copy.deepcopy(cpu).double()  # the reference the check measures both against
    men, rec = _example(cpu, 2, 3, 6, 4, seed=0)  # (B, K, L tokens, P image tokens)
    if codecs is None:
        records: tuple[Tensor, ...] = tuple(getattr(rec, n) for n in _RECORD)
    else:
        records = tuple(
            torch.from_numpy(a)
            for value, scale in _stored(rec, codecs).values()
            for a in (value, scale)
            if a is not None
        )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic
        # inputs m_<mention field>, e_<record field> (and e_<q8 field>_scale); outputs the
        # MimicScores fields
        names = [*(f"m_{n}" for n in _MENTION), *record_inputs(codecs)]
        dynamic: dict[str, dict[int, str]] = {
            "m_text_cls": {0: "B"},
            "m_text_tokens": {0: "B", 1: "L"},
            "m_image_cls": {0: "B"},
            "m_image_tokens": {0: "B", 1: "P"},
        }
        for name in record_inputs(codecs):
            field = name[2:].removesuffix("_scale")
            dynamic[name] = {0: "B", 1: "KI" if field in _IMAGE_FIELDS else "K"}
            if field == "tglu_query":
                dynamic[name][2] = "L"
        torch.onnx.export(
            _KernelGraph(cpu, codecs).eval(),
            tuple(getattr(men, n) for n in _MENTION) + records,
            str(tmp),
            input_names=names,
            output_names=list(_OUTPUTS),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    # checked on other shapes than the traced ones (so no size was frozen into the graph),
    # with images and with the one no-image record standing for every candidate
    sess = _session(tmp, 1)
    for b, k, length, p, one_image in (
        (1, 7, 9, 5, False),
        (3, 5, 6, 4, True),
        (2, 11, 4, 2, False),
    ):
        m2, r2 = _example(cpu, b, k, length, p, seed=b * 10 + k)
        if one_image:
            r2 = MimicEntityRecord(
                *(
                    getattr(r2, n)[:, :1].expand_as(getattr(r2, n)).contiguous()
                    if n in _IMAGE_FIELDS
                    else getattr(r2, n)
                    for n in _RECORD
                )
            )
        if codecs is None:
            feeds = _feeds(m2, r2, one_image)
        else:  # the reference scores the records as the store read decodes them
            stored = _stored(r2, codecs)
            feeds, r2 = _stored_feeds(m2, stored, one_image), _decoded(stored)
        with torch.inference_mode():
            want = score_candidates(exact, m2.map(torch.Tensor.double), r2.map(torch.Tensor.double))
            fp32 = score_candidates(cpu, m2, r2)
            own = _max_rel_error([getattr(fp32, n).numpy() for n in _OUTPUTS], want)
        err = _max_rel_error(sess.run(None, feeds), want)
        if not err <= EXPORT_CHECK_RTOL:
            tmp.unlink(missing_ok=True)
            raise OnnxRuntimeError(
                f"the exported MIMIC kernel differs from the kernel in float64 by {err:.1e} of "
                f"the largest score at B={b}, K={k}, L={length} (> {EXPORT_CHECK_RTOL}; the "
                f"float32 torch kernel: {own:.1e}); not cached"
            )
    tmp.replace(path)  # two processes exporting at once both write whole files; one wins
    logger.info("exported the MIMIC kernel to %s in %.1fs", path, time.perf_counter() - t0)
    return path


class OnnxKernel:
    """The kernel graph in an onnxruntime session (thread-safe: model workers share it);
    with ``stored_path`` (the graph exported for ``codecs``), also over stored records."""

    runtime = "onnx"

    def __init__(
        self,
        path: str | os.PathLike[str],
        threads: int,
        stored_path: str | os.PathLike[str] | None = None,
        codecs: Codecs | None = None,
    ) -> None:
        if (stored_path is None) != (codecs is None):
            raise ValueError("a stored-records graph comes with the codecs it was exported for")
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.codecs = _check_codecs(codecs) if codecs is not None else None
        self.stored_session = _session(Path(stored_path), threads) if stored_path else None

    def __call__(
        self, mentions: MimicFeatures, records: MimicEntityRecord, no_image: Tensor | None
    ) -> MimicScores:
        if records.text_cls.dim() != 3 or records.text_cls.shape[0] != mentions.text_cls.shape[0]:
            raise ValueError(
                f"the kernel scores per-mention candidate records (B={len(mentions)}, K, ...), "
                f"got {tuple(records.text_cls.shape)}"
            )
        one_image = no_image is not None and bool(no_image.all())
        out = self.session.run(None, _feeds(mentions, records, one_image))
        return MimicScores(*(torch.from_numpy(o) for o in out))

    def score_stored(
        self, mentions: MimicFeatures, stored: StoredRecords, no_image: Tensor | None
    ) -> MimicScores:
        """Scores of records as the store holds them (``stored``: each field's values and,
        for ``q8``, scales, ``(B, K, ...)``, coded as ``codecs`` says)."""
        if self.stored_session is None:
            raise ValueError("this kernel was loaded without a stored-records graph")
        value = stored["text_cls"][0]
        if value.ndim != 3 or value.shape[0] != mentions.text_cls.shape[0]:
            raise ValueError(
                f"the kernel scores per-mention candidate records (B={len(mentions)}, K, ...), "
                f"got {value.shape}"
            )
        one_image = no_image is not None and bool(no_image.all())
        out = self.stored_session.run(None, _stored_feeds(mentions, stored, one_image))
        return MimicScores(*(torch.from_numpy(o) for o in out))


def load_kernel(
    matcher: MimicMatcher,
    runtime: str | None,
    cache_dir: str | os.PathLike[str],
    threads: int,
    device: torch.device,
    codecs: Codecs | None = None,
) -> MimicKernel:
    """The kernel ``runtime`` asks for; None: onnx on the CPU, torch on a GPU. With None, an
    export that fails its check falls back to the torch kernel (logged); asked for by name,
    it raises. ``codecs`` (the store's, per record field): the onnx kernel also takes the
    records as stored (:meth:`OnnxKernel.score_stored`)."""
    if runtime is not None and runtime not in KERNEL_RUNTIMES:
        raise ValueError(f"kernel runtime must be one of {KERNEL_RUNTIMES}, got {runtime!r}")
    chosen = runtime or ("torch" if device.type != "cpu" else "onnx")
    if chosen == "torch":
        return TorchKernel(matcher)
    if device.type != "cpu":
        raise ValueError("kernel runtime onnx runs on the CPU; a CUDA model uses torch")
    try:
        path = ensure_kernel_export(matcher, cache_dir)
        stored = ensure_kernel_export(matcher, cache_dir, codecs) if codecs is not None else None
    except OnnxRuntimeError as exc:
        if runtime is not None:
            raise
        logger.warning("MIMIC kernel: %s; serving the torch kernel instead", exc)
        return TorchKernel(matcher)
    return OnnxKernel(path, threads, stored, codecs)


__all__ = [
    "KERNEL_RUNTIMES",
    "STORED_CODECS",
    "Codecs",
    "MimicKernel",
    "OnnxKernel",
    "StoredRecords",
    "TorchKernel",
    "ensure_kernel_export",
    "export_key",
    "load_kernel",
    "record_inputs",
]
