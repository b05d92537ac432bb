"""The DRIN kernel's onnxruntime graph (models/onnx_drin_kernel.py) == the torch kernel
(models/drin_kernel.py) on fresh random inputs and shapes it was not traced at, masks and
image groups and the folded entity table included; its export cache; the runtime choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models.onnx_drin_kernel as odk
from models.drin_kernel import DrinKernel
from models.onnx_drin_kernel import (
    OnnxDrinKernel,
    ensure_drin_export,
    export_key,
    load_drin_kernel,
)
from models.onnx_encoders import OnnxRuntimeError
from tests.test_drin_kernel import _candidates, _kb, _model, _parts

F32 = torch.float32


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize(("b", "k", "masked"), [(1, 100, False), (4, 9, True), (3, 1, False)])
def test_onnx_drin_kernel_equals_the_torch_kernel(
    tmp_path: Path, layers: int, b: int, k: int, masked: bool
) -> None:
    model = _model(layers, dtype=F32)
    torch_kernel = DrinKernel(model)
    onnx = load_drin_kernel(model, "onnx", tmp_path, 1)
    assert isinstance(onnx, OnnxDrinKernel) and onnx.runtime == "onnx"
    groups = torch.randint(0, 4, (b, k), generator=torch.Generator().manual_seed(k))
    m, e = _parts(b, k, seed=b + k, groups=groups, dtype=F32)
    mask = None
    if masked:
        mask = torch.ones(b, k, dtype=torch.bool)
        mask[0, -2:] = False
        mask[1, 0] = False
    want = torch_kernel(m, e, mask, groups)
    got = onnx(m, e, mask, groups)
    for g, w, what in zip(got, want, ("scores", "edges"), strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=what)
    if mask is not None:
        assert torch.isinf(got[0][~mask]).all()


def test_all_true_mask_is_the_unmasked_kernel_bit_for_bit() -> None:
    """The graph always takes a mask; all true must be the torch kernel's unmasked path."""
    model = _model(2, dtype=F32)
    kernel = DrinKernel(model)
    m, e = _parts(3, 7, seed=1, dtype=F32)
    a = kernel(m, e, None)
    b = kernel(m, e, torch.ones(3, 7, dtype=torch.bool))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_entity_table_feeds_the_graph(tmp_path: Path) -> None:
    model = _model(2, dtype=F32)
    kb = tuple(t.to(F32) if t.is_floating_point() else t for t in _kb())
    text, image = kb[0], kb[1]
    onnx = load_drin_kernel(model, "onnx", tmp_path, 1)
    table = onnx.entity_table([text[:5], text[5:]], [image])
    rows = torch.tensor([[0, 3, 11, 7], [2, 2, 5, -1]])
    e, groups = _candidates(kb, rows)
    m, _ = _parts(2, 1, seed=3, dtype=F32)
    mask = rows >= 0
    want = DrinKernel(model)(m, e, mask, groups)
    got = onnx(m, e, mask, groups, rows, table)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)


def test_export_is_cached_keyed_by_the_weights_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(2, dtype=F32)
    first = ensure_drin_export(model, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert ensure_drin_export(model, tmp_path) == first and first.stat().st_mtime_ns == stamp
    other = _model(2, dtype=F32)
    with torch.no_grad():
        other.drin.layers[0].w_h.weight.add_(1e-3)
    assert export_key(other) != export_key(model)
    # a graph that computes something else is refused and not cached
    forward = odk._DrinGraph.forward

    def off(self: odk._DrinGraph, *a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, edges = forward(self, *a)
        return s + 1e-4, edges

    monkeypatch.setattr(odk._DrinGraph, "forward", off)
    bad = tmp_path / "bad"
    with pytest.raises(OnnxRuntimeError, match="float64"):
        ensure_drin_export(other, bad)
    assert [p for p in bad.rglob("*") if p.is_file()] == []
    # the default runtime serves the torch kernel then; asked for by name, onnx raises
    assert type(load_drin_kernel(other, None, bad, 1)) is DrinKernel
    with pytest.raises(OnnxRuntimeError):
        load_drin_kernel(other, "onnx", bad, 1)


def test_runtime_choice(tmp_path: Path) -> None:
    model = _model(1, dtype=F32)
    assert isinstance(load_drin_kernel(model, None, tmp_path, 1), OnnxDrinKernel)  # CPU default
    assert type(load_drin_kernel(model, "torch", tmp_path, 1)) is DrinKernel
    double = _model(1)  # float64: the torch kernel (the graph is float32)
    assert type(load_drin_kernel(double, None, tmp_path, 1)) is DrinKernel
    with pytest.raises(ValueError, match="float32"):
        load_drin_kernel(double, "onnx", tmp_path, 1)


def test_weights_changed_after_export_score_through_torch(tmp_path: Path) -> None:
    model = _model(2, dtype=F32)
    onnx = load_drin_kernel(model, "onnx", tmp_path, 1)
    assert isinstance(onnx, OnnxDrinKernel)
    with torch.no_grad():
        model.drin.layers[0].w_h.weight.mul_(1.5)  # the graph holds the old weights
    m, e = _parts(2, 5, seed=4, dtype=F32)
    want = DrinKernel(model)(m, e)
    got = onnx(m, e)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    assert odk.DRIN_EXPORT_VERSION >= 1
