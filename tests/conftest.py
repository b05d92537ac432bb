"""Shared fixtures: tiny random-weight models built from configs (no hub, no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: tiny test tensors gain nothing from more, and OpenMP workers stall badly
# whenever the other core is busy (measured: a small LayerNorm 13 us -> 7.8 ms with 2 threads).
torch.set_num_threads(1)
# ... and the same for every Linker, server and job the tests start (in-process or as a
# subprocess, which inherits it): their default would be the cores free at their start.
os.environ.setdefault("MEL_INTRA_OP_THREADS", "1")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_clip(folder: Path, seed: int = 0, image_size: int = 30, patch: int = 15) -> Path:
    """A CLIPModel folder with 32-wide towers, a character-level tokenizer and processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.save_pretrained(folder)
    proc = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    proc.save_pretrained(folder)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": len(vocab),
            "max_position_embeddings": 64,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 24,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch,
        },
        projection_dim=32,  # MIMIC needs projection_dim == text hidden (one dt)
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def write_tiny_world(root: Path, seed: int = 0) -> Path:
    """16 entities in 4 same-name groups (colour tells them apart), 64 mentions, 3 splits."""
    import random

    from PIL import Image, ImageDraw

    from models.data.schema import Entity, Mention, write_json, write_jsonl, write_meta

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 200, 20)]
    jobs = ["painter", "pilot", "chemist", "singer"]
    ents, ments = [], []
    for g, surname in enumerate(["Ames", "Bell", "Cole", "Dunn"]):
        for k in range(4):
            eid = f"E{g}{k}"
            img = None
            if k != 3:  # one member per group has no image
                img = f"images/{eid}.jpg"
                im = Image.new("RGB", (32, 32), colours[k])
                ImageDraw.Draw(im).ellipse((8, 8, 24, 24), fill=(255, 255, 255))
                im.save(root / img)
            ents.append(
                Entity(eid, f"Jo {surname}", f"Occupation: {jobs[k]}.", (img,) if img else ())
            )
            for j in range(4):
                mid = f"M{g}{k}{j}"
                sent = f"Jo {surname} the {jobs[k]} spoke."
                mimg = None
                if img and j % 2 == 0:
                    mimg = f"images/{mid}.jpg"
                    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colours[k])
                    Image.new("RGB", (32, 32), jitter).save(root / mimg)
                ments.append(Mention(mid, f"Jo {surname}", sent, (0, 3 + len(surname)), mimg, eid))
    write_jsonl(root / "kb.jsonl", ents)
    write_jsonl(root / "mentions.jsonl", ments)
    ids = [m.id for m in ments]
    rng.shuffle(ids)
    write_json(root / "splits.json", {"train": ids[:44], "dev": ids[44:54], "test": ids[54:]})
    write_meta(root, name="tiny", source="tests/conftest.py")
    return root


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def artifacts(
    tiny_clip_dir: Path,
    tiny_world: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path]:
    """(model folder, index folder): a tiny random-weight model and the tiny world's index.

    Shared by the HTTP tests (tests/test_service.py) and the OpenAPI fuzz
    (tests/test_openapi_fuzz.py); read-only, so one build serves the whole session.
    """
    from index.build import BuildConfig, build
    from models.encoders import ClipBackbone
    from models.model import LinkingModel

    root = tmp_path_factory.mktemp("svc")
    torch.manual_seed(5)
    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    model.save_pretrained(root / "model")
    build(
        BuildConfig(
            kb=str(tiny_world / "kb.jsonl"),
            model=str(root / "model"),
            out=str(root / "index"),
            chunk_size=8,
            batch_size=8,
            workers=2,
            progress=False,
            device="cpu",
        )
    )
    return root / "model", root / "index"
