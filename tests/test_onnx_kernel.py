"""The MIMIC kernel's onnxruntime graph (models/onnx_kernel.py) == MimicMatcher.score_precomputed
on fresh random inputs and shapes it was not traced at; its export cache; the runtime choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import models.onnx_kernel as ok
from models.mimic import MimicConfig, MimicEntityRecord, MimicFeatures, MimicMatcher
from models.onnx_kernel import (
    OnnxKernel,
    TorchKernel,
    ensure_kernel_export,
    export_key,
    load_kernel,
)
from tests.reference_mimic import randomise_layernorms, without_images

CFG = MimicConfig(dt=32, dv=12, tglu_hidden_dim=16, idlu_hidden_dim=16, cmfu_hidden_dim=16)
FIELDS = ("score", "tglu", "vdlu", "cmfu")
CPU = torch.device("cpu")


def _matcher(seed: int, cfg: MimicConfig = CFG) -> MimicMatcher:
    torch.manual_seed(seed)
    m = MimicMatcher(cfg)
    randomise_layernorms(m)
    return m.eval()


def _feats(
    *lead: int, gen: torch.Generator, cfg: MimicConfig = CFG, length: int = 7, p: int = 5
) -> MimicFeatures:
    def r(*s: int) -> torch.Tensor:
        return torch.randn(*lead, *s, generator=gen)

    return MimicFeatures(r(cfg.dt), r(length, cfg.dt), r(cfg.dv), r(p, cfg.dv))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[MimicMatcher, OnnxKernel]:
    m = _matcher(seed=11)
    path = ensure_kernel_export(m, tmp_path_factory.mktemp("kernel"))
    return m, OnnxKernel(path, threads=1)


@pytest.mark.parametrize(("b", "k", "length"), [(1, 1, 7), (1, 100, 40), (4, 9, 7), (32, 3, 5)])
def test_onnx_kernel_equals_score_precomputed(
    exported: tuple[MimicMatcher, OnnxKernel], b: int, k: int, length: int
) -> None:
    m, kernel = exported
    gen = torch.Generator().manual_seed(b * 100 + k)
    men = _feats(b, gen=gen, length=length)
    rec = m.precompute_entities(_feats(b, k, gen=gen, length=length))
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec)
    got = kernel(men, rec, None)
    for f in FIELDS:
        assert getattr(got, f).shape == (b, k)
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=0, atol=1e-5, msg=f)


@pytest.mark.parametrize("share", [1.0, 0.4])
def test_onnx_kernel_with_imageless_candidates(
    exported: tuple[MimicMatcher, OnnxKernel], share: float
) -> None:
    """fp16 records as the store holds them; when every candidate carries the no-image
    record the graph gets it once per mention (KI = 1) and broadcasts it; same scores."""
    m, kernel = exported
    gen = torch.Generator().manual_seed(3)
    b, k = 3, 8
    men = _feats(b, gen=gen)
    ent = _feats(b, k, gen=gen)
    blank = _feats(1, gen=gen)
    no_image = torch.rand(b, k, generator=gen) < share
    ent = without_images(ent, blank, no_image)
    rec = m.precompute_entities(ent).map(lambda t: t.half())
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec)
    got = kernel(men, rec, no_image)
    for f in FIELDS:
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=0, atol=1e-5, msg=f)


def test_onnx_kernel_refuses_shared_records(exported: tuple[MimicMatcher, OnnxKernel]) -> None:
    m, kernel = exported
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="per-mention"):
        kernel(_feats(2, gen=gen), m.precompute_entities(_feats(5, gen=gen)), None)


def test_export_is_cached_and_keyed_by_the_weights(tmp_path: Path) -> None:
    m = _matcher(seed=1)
    first = ensure_kernel_export(m, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert ensure_kernel_export(m, tmp_path) == first  # reused, not re-exported
    assert first.stat().st_mtime_ns == stamp
    other = _matcher(seed=2)
    assert export_key(other) != export_key(m)
    with torch.no_grad():
        m.tglu.fc_key.weight.add_(1e-3)  # any weight change is another graph
    assert ensure_kernel_export(m, tmp_path) != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []


def test_export_check_refuses_a_wrong_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check against the kernel in float64 passes fp32 rounding (above) but not a graph
    that computes something else: here one score off by 1e-4 of its value."""
    import models.onnx_kernel as ok

    forward = ok._KernelGraph.forward

    def off(self: ok._KernelGraph, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s, *units = forward(self, *inputs)
        return (s * (1 + 1e-4), *units)

    monkeypatch.setattr(ok._KernelGraph, "forward", off)
    with pytest.raises(ok.OnnxRuntimeError, match="float64"):
        ensure_kernel_export(_matcher(seed=3), tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing cached
    # the default runtime serves the torch kernel then; asked for by name, onnx raises
    assert isinstance(load_kernel(_matcher(seed=3), None, tmp_path, 1, CPU), TorchKernel)
    with pytest.raises(ok.OnnxRuntimeError):
        load_kernel(_matcher(seed=3), "onnx", tmp_path, 1, CPU)


def test_units_are_the_matchers(tmp_path: Path) -> None:
    cfg = MimicConfig(
        dt=32,
        dv=12,
        tglu_hidden_dim=16,
        idlu_hidden_dim=16,
        cmfu_hidden_dim=16,
        units=("tglu", "cmfu"),
    )
    m = _matcher(seed=5, cfg=cfg)
    kernel = OnnxKernel(ensure_kernel_export(m, tmp_path), threads=1)
    gen = torch.Generator().manual_seed(5)
    men = _feats(2, gen=gen, cfg=cfg)
    rec: MimicEntityRecord = m.precompute_entities(_feats(2, 4, gen=gen, cfg=cfg))
    with torch.inference_mode():
        ref = m.score_precomputed(men, rec)
    torch.testing.assert_close(kernel(men, rec, None).score, ref.score, rtol=0, atol=1e-5)


def test_load_kernel_runtime_choice(tmp_path: Path) -> None:
    m = _matcher(seed=0)
    assert isinstance(load_kernel(m, None, tmp_path, 1, CPU), OnnxKernel)  # the CPU default
    assert isinstance(load_kernel(m, "torch", tmp_path, 1, CPU), TorchKernel)
    assert isinstance(load_kernel(m, None, tmp_path, 1, torch.device("cuda")), TorchKernel)
    with pytest.raises(ValueError, match="kernel runtime"):
        load_kernel(m, "tensorrt", tmp_path, 1, CPU)
    with pytest.raises(ValueError, match="CPU"):
        load_kernel(m, "onnx", tmp_path, 1, torch.device("cuda"))


CODECS = {
    "text_cls": "f16",
    "tglu_cls": "f16",
    "tglu_query": "q8",
    "e2m_query": "f16",
    "m2e_key": "q8",
    "m2e_pooled": "f16",
    "cmfu": "f16",
}


@pytest.fixture(scope="module")
def stored_kernel(tmp_path_factory: pytest.TempPathFactory) -> tuple[MimicMatcher, OnnxKernel]:
    m = _matcher(seed=11)
    folder = tmp_path_factory.mktemp("stored")
    kernel = load_kernel(m, "onnx", folder, 1, CPU, codecs=CODECS)
    assert isinstance(kernel, OnnxKernel) and kernel.codecs == CODECS
    return m, kernel


@pytest.mark.parametrize(("b", "k", "share"), [(1, 100, 0.3), (4, 9, 1.0), (3, 6, 0.0)])
def test_stored_records_score_as_their_float32_decode(
    stored_kernel: tuple[MimicMatcher, OnnxKernel], b: int, k: int, share: float
) -> None:
    """The graph over records as the store codes them decodes them inside (float16 cast, q8
    values times their row's scale) into the very float32 records the numpy read gives:
    the same scores as the float32 graph over that read, bit for bit."""
    m, kernel = stored_kernel
    gen = torch.Generator().manual_seed(b * 100 + k)
    men = _feats(b, gen=gen, length=40)
    ent = _feats(b, k, gen=gen, length=40)
    no_image = torch.rand(b, k, generator=gen) < share
    ent = without_images(ent, _feats(1, gen=gen, length=40), no_image)
    rec = m.precompute_entities(ent)
    stored = {n: ok._code(getattr(rec, n), CODECS[n]) for n in MimicEntityRecord.field_names()}
    assert stored["tglu_query"][0].dtype == np.int8 and stored["text_cls"][1] is None
    decoded = ok._decoded(stored)  # what IndexSearcher.records gives for these codes
    got = kernel.score_stored(men, stored, no_image)
    want = kernel(men, decoded, no_image)
    for f in FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    with torch.inference_mode():
        ref = m.score_precomputed(men, decoded)
        torch_stored = TorchKernel(m).score_stored(men, stored, no_image)
    for f in FIELDS:
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=0, atol=1e-5, msg=f)
        torch.testing.assert_close(getattr(torch_stored, f), getattr(ref, f), rtol=0, atol=1e-5)


def test_stored_graph_is_its_own_export(tmp_path: Path) -> None:
    m = _matcher(seed=4)
    plain = ensure_kernel_export(m, tmp_path)
    assert export_key(m) == export_key(m, None)  # the float32 graph's key is unchanged
    stored = ensure_kernel_export(m, tmp_path, CODECS)
    other = ensure_kernel_export(m, tmp_path, {**CODECS, "tglu_query": "f16"})
    assert len({plain, stored, other}) == 3
    assert ensure_kernel_export(m, tmp_path, dict(CODECS)) == stored  # reused
    with pytest.raises(ValueError, match="codec"):
        ensure_kernel_export(m, tmp_path, {**CODECS, "cmfu": "f32"})
    with pytest.raises(ValueError, match="codec"):
        ensure_kernel_export(m, tmp_path, {n: c for n, c in CODECS.items() if n != "cmfu"})
    assert load_kernel(m, "onnx", tmp_path, 1, CPU).codecs is None  # no codecs: float32 only
    with pytest.raises(ValueError, match="stored-records graph"):
        load_kernel(m, "onnx", tmp_path, 1, CPU).score_stored(
            _feats(1, gen=torch.Generator()), {}, None
        )
