"""Training / evaluation CLIs end to end on a tiny world with a tiny random CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import train as train_module
from models.data.schema import load_dataset
from models.evaluate import evaluate_split
from models.evaluate import main as eval_main
from models.features import dataset_features
from models.metrics import gold_ranks
from models.model import LinkingModel
from models.train import NO_DECAY, TrainConfig, param_groups, reproducible, train


def _cfg(world: Path, clip: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        data=str(world),
        out=str(out),
        backend="clip",
        clip_path=str(clip),
        dv=8,
        hidden=12,
        epochs=4,
        batch_size=8,
        lr=3e-3,
        val_every=2,
        patience=5,
        seed=1,
        workers=2,
        cache_dir=str(out.parent / "cache"),
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_frozen_training_learns_and_saves_best(
    tiny_world: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    summary = train(_cfg(tiny_world, tiny_clip_dir, out, epochs=6))
    hist = summary["history"]
    assert len(hist) == 6
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert [h["epoch"] for h in hist if "val" in h] == [2, 4, 6]
    best = LinkingModel.from_pretrained(out / "best")
    assert best.meta["val"]["MRR"] == pytest.approx(summary["best_val_mrr"])
    # the backbone is frozen: only the heads differ from a fresh model's backbone
    fresh = LinkingModel.from_pretrained(out / "last")
    for k, v in best.encoder.backbone.state_dict().items():
        torch.testing.assert_close(v, fresh.encoder.backbone.state_dict()[k])
    # evaluation CLI writes the paper's metrics
    res = tmp_path / "eval.json"
    assert (
        eval_main(
            [
                "--model",
                str(out / "best"),
                "--data",
                str(tiny_world),
                "--split",
                "test",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(res),
            ]
        )
        == 0
    )
    m = json.loads(res.read_text())
    assert {"H@1", "H@3", "H@5", "H@10", "H@20", "MRR", "MR"} <= set(m)
    assert m["count"] == 10 and m["entities"] == 16
    # the CLI's figures == the metrics of ranks recomputed from the per-pair MIMIC scores
    ds = load_dataset(tiny_world)
    feats = dataset_features(best.encoder, ds, str(tmp_path / "cache"))
    mentions = [x for x in ds.split("test") if x.entity_id]
    gold = torch.tensor([ds.entity_row[x.entity_id] for x in mentions if x.entity_id])
    rows, ents = feats.mention_rows(mentions), torch.arange(len(ds.entities))
    with torch.inference_mode():
        m_feats = feats.mentions.gather(rows, feats.mentions.first_image_rows(rows))
        e_feats = feats.entities.gather(ents, feats.entities.first_image_rows(ents))
        records = best.matcher.precompute_entities(best.encoder.project(*e_feats))
        scores = best.matcher.score_precomputed(best.encoder.project(*m_feats), records)
    ranks = gold_ranks(scores.score, gold).double()
    assert m["MR"] == pytest.approx(float(ranks.mean()), abs=1e-9)
    assert m["MRR"] == pytest.approx(float((1 / ranks).mean()), abs=1e-9)
    for k in (1, 3, 5):
        assert m[f"H@{k}"] == pytest.approx(float((ranks <= k).double().mean()), abs=1e-9)
    assert (
        eval_main(
            [
                "--model",
                str(out / "best"),
                "--data",
                str(tiny_world),
                "--drop-unit",
                "cmfu",
                "--cache-dir",
                "",
                "--out",
                str(res),
            ]
        )
        == 0
    )
    assert json.loads(res.read_text())["units"] == ["tglu", "vdlu"]


def test_resume_equals_uninterrupted(tiny_world: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    train(_cfg(tiny_world, tiny_clip_dir, tmp_path / "a", epochs=4))
    # "killed" after 2 epochs, then resumed to 4
    train(_cfg(tiny_world, tiny_clip_dir, tmp_path / "b", epochs=2))
    train(_cfg(tiny_world, tiny_clip_dir, tmp_path / "b", epochs=4, resume=True))
    a = LinkingModel.from_pretrained(tmp_path / "a" / "last")
    b = LinkingModel.from_pretrained(tmp_path / "b" / "last")
    assert a.fingerprint() == b.fingerprint()
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_ablation_units_and_full_mode(
    tiny_world: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    text_only = train(_cfg(tiny_world, tiny_clip_dir, tmp_path / "t", epochs=2, units=("tglu",)))
    assert text_only["epochs_run"] == 2
    m = LinkingModel.from_pretrained(tmp_path / "t" / "best")
    assert m.config.mimic.units == ("tglu",)
    before = LinkingModel.from_pretrained(tmp_path / "t" / "best").encoder.backbone
    train(
        _cfg(
            tiny_world,
            tiny_clip_dir,
            tmp_path / "f",
            epochs=2,
            mode="full",
            init=str(tmp_path / "t" / "best"),
        )
    )
    tuned = LinkingModel.from_pretrained(tmp_path / "f" / "last")
    assert tuned.config.encoder.backbone_in_checkpoint
    moved = [
        k
        for k, v in tuned.encoder.backbone.state_dict().items()
        if not torch.equal(v, before.state_dict()[k])
    ]
    assert moved, "full fine-tuning must update backbone weights"


def test_weight_decay_groups_follow_the_released_substring_rule(tiny_clip_dir: Path) -> None:
    from models.encoders import ClipBackbone

    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    decay, no_decay = param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bias" in names[id(p)] for p in no_decay["params"])
    assert any("layer_norm.weight" in names[id(p)] for p in decay["params"])  # decays, as released
    assert NO_DECAY == ("bias", "LayerNorm.bias", "LayerNorm.weight")


def test_evaluate_split_is_batch_size_invariant(tiny_world: Path, tiny_clip_dir: Path) -> None:
    from models.encoders import ClipBackbone

    torch.manual_seed(0)
    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    ds = load_dataset(tiny_world)
    feats = dataset_features(model.encoder, ds, None, batch_size=5)
    a = evaluate_split(model, ds, feats, "dev", batch_size=1)
    b = evaluate_split(model, ds, feats, "dev", batch_size=32)
    assert a["MRR"] == pytest.approx(b["MRR"], abs=1e-9) and a["MR"] == b["MR"]


def test_retrieval_restricted_validation(
    tiny_world: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rv"
    summary = train(_cfg(tiny_world, tiny_clip_dir, out, epochs=2, val_candidates=4))
    val = summary["history"][-1]["val"]
    assert val["candidates"] == 4 and 0.0 <= val["recall@candidates"] <= 1.0
    assert val["H@5"] == val["H@20"] == pytest.approx(val["recall@candidates"])
    # the default stays full-KB ranking: no candidate fields
    plain = train(_cfg(tiny_world, tiny_clip_dir, tmp_path / "full", epochs=2))
    assert "candidates" not in plain["history"][-1]["val"]
    # same seed, same training: only the validation differs
    a = LinkingModel.from_pretrained(out / "last")
    b = LinkingModel.from_pretrained(tmp_path / "full" / "last")
    assert a.fingerprint() == b.fingerprint()


def test_hard_negatives_train_and_resume(
    tiny_world: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    from models.train import mine_hard_negatives

    kw: dict[str, object] = dict(hard_negatives=2, hard_negative_pool=4, val_candidates=5)
    a = train(_cfg(tiny_world, tiny_clip_dir, tmp_path / "a", epochs=4, **kw))
    assert a["history"][-1]["loss"] < a["history"][0]["loss"]
    # killed after 2 epochs and resumed: the same weights (mining is a function of the model)
    train(_cfg(tiny_world, tiny_clip_dir, tmp_path / "b", epochs=2, **kw))
    train(_cfg(tiny_world, tiny_clip_dir, tmp_path / "b", epochs=4, resume=True, **kw))
    ma = LinkingModel.from_pretrained(tmp_path / "a" / "last")
    mb = LinkingModel.from_pretrained(tmp_path / "b" / "last")
    assert ma.fingerprint() == mb.fingerprint()
    # mined rows: never the gold, distinct, best retrieval score first
    ds = load_dataset(tiny_world)
    feats = dataset_features(ma.encoder, ds, str(tmp_path / "cache"))
    train_m = [m for m in ds.split("train") if m.entity_id]
    gold = torch.tensor([ds.entity_row[m.entity_id] for m in train_m if m.entity_id])
    negs = mine_hard_negatives(ma, feats, train_m, gold, pool=4)
    assert negs.shape == (len(train_m), 4)
    assert not (negs == gold.unsqueeze(1)).any()
    assert all(len(set(r.tolist())) == 4 for r in negs)


def test_training_runs_torch_deterministic_kernels_then_restores(
    tiny_world: Path, tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two CPU threads made real runs differ in the last bits; the flag is on while training."""
    seen: list[bool] = []
    real_build = train_module.build_model

    def spy_build(cfg: TrainConfig) -> LinkingModel:
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real_build(cfg)

    monkeypatch.setattr(train_module, "build_model", spy_build)
    assert not torch.are_deterministic_algorithms_enabled()
    train(_cfg(tiny_world, tiny_clip_dir, tmp_path / "a", epochs=1))
    assert seen == [True]
    assert not torch.are_deterministic_algorithms_enabled()


def test_reproducible_seeds_and_restores_even_on_error() -> None:
    with reproducible(5) as gen:
        a = torch.rand(3, generator=gen), torch.rand(3)
    with pytest.raises(RuntimeError, match="boom"), reproducible(5) as gen:
        assert torch.are_deterministic_algorithms_enabled()
        b = torch.rand(3, generator=gen), torch.rand(3)
        raise RuntimeError("boom")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.are_deterministic_algorithms_enabled()
