"""The fusion trees compiled by lleaves compute what LightGBM computes: rankers and binary
verifiers, missing values where training had them and where it had none, the compile cache,
and the fusion model's two runtimes side by side."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

import models.compiled_trees as ct
from models.compiled_trees import (
    CompiledTrees,
    cache_key,
    resolve_tree_runtime,
)
from models.fusion import EntityPrior, FusionConfig, FusionModel, all_features


def _data(n: int, f: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features with missing values in column 1 and ties in column 2, and a target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32)
    x[:, 1][rng.random(n) < 0.2] = np.nan  # column 1 has missing values in training
    x[:, 2] = np.round(x[:, 2])  # a few distinct values: thresholds land on ties
    y = x[:, 0] + 0.5 * np.nan_to_num(x[:, 1]) + 0.3 * x[:, 2] + rng.normal(size=n)
    return x, y


def _ranker(trees: int = 20) -> lgb.Booster:
    x, y = _data(2000, 6, 0)
    rel = np.digitize(y, [0.0, 1.0]).astype(int)  # relevance 0-2
    params = {"objective": "lambdarank", "num_leaves": 15, "verbose": -1, "seed": 0}
    return lgb.train(params, lgb.Dataset(x, rel, group=[20] * 100), trees)


def _binary(trees: int = 15, features: int = 6) -> lgb.Booster:
    x, y = _data(2000, features, 1)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": 0}
    return lgb.train(params, lgb.Dataset(x, (y > 0.5).astype(int)), trees)


def _queries(seed: int, features: int = 6) -> np.ndarray:
    x, _ = _data(300, features, seed)
    x[::7, 0] = np.nan  # column 0 never missing in training: LightGBM reads it as 0
    x[::11, :] = np.nan  # whole rows missing (padding rows are all NaN)
    x[5, 3] = np.inf
    return x


@pytest.mark.parametrize("make", [_ranker, _binary], ids=["lambdarank", "binary"])
def test_compiled_equals_lightgbm(make, tmp_path: Path) -> None:
    booster = make()
    trees = CompiledTrees(booster.model_to_string(), tmp_path)
    x = _queries(5)
    want = booster.predict(x, num_threads=1)
    got = trees.predict(x)
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    if make is _binary:  # the objective's sigmoid is applied, as predict() does
        assert ((got > 0) & (got < 1)).all()
    assert trees.predict(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="features"):
        trees.predict(x[:, :3])


def test_the_cache_is_reused_and_keyed_by_the_model(tmp_path: Path) -> None:
    a, b = _ranker(10), _ranker(12)
    first = CompiledTrees(a.model_to_string(), tmp_path)
    objects = sorted(tmp_path.glob("trees-*.o"))
    assert [p.name for p in objects] == [f"trees-{first.key}.o"]
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed
    again = CompiledTrees(a.model_to_string(), tmp_path)  # loaded, not compiled
    x = _queries(6)
    assert np.array_equal(again.predict(x), first.predict(x))
    other = CompiledTrees(b.model_to_string(), tmp_path)
    assert other.key != first.key == cache_key(a.model_to_string())
    np.testing.assert_allclose(other.predict(x), b.predict(x, num_threads=1), atol=1e-12)


def test_a_cache_that_cannot_be_made_only_costs_the_compile(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    booster = _ranker(8)
    trees = CompiledTrees(booster.model_to_string(), tmp_path / "file" / "cache")
    x = _queries(7)
    np.testing.assert_allclose(trees.predict(x), booster.predict(x), atol=1e-12)


def test_no_cache_folder(tmp_path: Path) -> None:
    booster = _binary(5)
    x = _queries(8)
    trees = CompiledTrees(booster.model_to_string())
    np.testing.assert_allclose(trees.predict(x), booster.predict(x), atol=1e-12)


def test_runtime_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tree_runtime(None) == "compiled"  # lleaves is a dependency
    assert resolve_tree_runtime("lightgbm") == "lightgbm"
    with pytest.raises(ValueError, match="tree runtime"):
        resolve_tree_runtime("xgboost")
    # where lleaves cannot be imported: the default falls back, an explicit request refuses
    monkeypatch.setattr(ct, "compiled_available", lambda: False)
    assert resolve_tree_runtime(None) == "lightgbm"
    with pytest.raises(RuntimeError, match="lleaves"):
        resolve_tree_runtime("compiled")


def test_fusion_model_scores_and_verifies_alike_in_both_runtimes(tmp_path: Path) -> None:
    names = ("dense", "dense_rank", "mimic", "mimic_rank", "name_cos", "trigram_cosine")
    # a v1 verifier reads the best score, margin, probability, list length and 6 features
    ranker, other, verifier = _ranker(), _ranker(9), _binary(features=4 + len(names))
    config = FusionConfig(names, "abc", verifier_inputs=1, verifier_target="in_list")
    model = FusionModel(config, [ranker, other], EntityPrior(), verifier)
    assert model.tree_runtime == "lightgbm"
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 30, len(all_features()))).astype(np.float32)
    x[1, 25:] = np.nan  # padding
    valid = ~np.isnan(x[..., 0])
    probs = np.where(valid, rng.uniform(0, 0.1, valid.shape), 0.0)
    s_lgb = model.score(x)
    v_lgb = model.verify(s_lgb, probs, x, valid)
    assert model.use_tree_runtime("compiled", tmp_path) == "compiled"
    s_c = model.score(x)
    v_c = model.verify(s_c, probs, x, valid)
    assert np.array_equal(np.isinf(s_c), ~valid)
    np.testing.assert_allclose(s_c[valid], s_lgb[valid], rtol=0, atol=1e-6)  # float32 out
    assert v_c is not None and v_lgb is not None
    np.testing.assert_allclose(v_c.answer, v_lgb.answer, atol=1e-6)
    np.testing.assert_allclose(v_c.in_list, v_lgb.in_list, atol=1e-6)
    # SHAP contributions still come from the boosters, and still add up to the score
    c = model.contributions(x[0])
    np.testing.assert_allclose(c.sum(axis=1), s_c[0], atol=1e-4)
    assert model.use_tree_runtime("lightgbm") == "lightgbm"
    assert np.array_equal(model.score(x), s_lgb)
