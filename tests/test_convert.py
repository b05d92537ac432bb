"""A released-layout MIMIC checkpoint converts and scores like the released computation."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from models.convert import convert_official_checkpoint, main
from models.mimic import MimicConfig, MimicMatcher
from models.model import LinkingModel
from models.preprocess import entity_text, mention_text
from tests.reference_mimic import pair_scores, randomise_layernorms


class FakeHyperParams:
    """Stands for the OmegaConf object Lightning pickles into released checkpoints."""

    def __init__(self) -> None:
        self.lr = 1e-5
        self.model = {"dv": 8}


def _official_checkpoint(clip_dir: Path, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    clip = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():  # MIMIC fine-tunes CLIP: the .ckpt's CLIP weights differ from the folder
        for p in clip.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = MimicConfig(dt=32, dv=8, tglu_hidden_dim=12, idlu_hidden_dim=12, cmfu_hidden_dim=12)
    matcher = MimicMatcher(cfg)
    randomise_layernorms(matcher)
    image_cls_fc, image_tokens_fc = torch.nn.Linear(32, 8), torch.nn.Linear(24, 8)
    state = {f"encoder.clip.{k}": v for k, v in clip.state_dict().items()}
    state.update({f"encoder.image_cls_fc.{k}": v for k, v in image_cls_fc.state_dict().items()})
    state.update(
        {f"encoder.image_tokens_fc.{k}": v for k, v in image_tokens_fc.state_dict().items()}
    )
    state.update({f"matcher.{k}": v for k, v in matcher.state_dict().items()})
    torch.save({"state_dict": state, "hyper_parameters": FakeHyperParams(), "epoch": 3}, path)
    return state


def _released_features(
    clip_dir: Path,
    state: dict[str, torch.Tensor],
    texts: list[str],
    images: list[Image.Image | None],
) -> tuple[torch.Tensor, ...]:
    """MIMICEncoder.forward as released: one CLIPModel forward, then the two fc layers."""
    clip = CLIPModel.from_pretrained(clip_dir)
    clip.load_state_dict(
        {k[len("encoder.clip.") :]: v for k, v in state.items() if k.startswith("encoder.clip.")},
        strict=False,
    )
    clip.eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    enc = tok(texts, padding="max_length", max_length=40, truncation=True, return_tensors="pt")
    size = proc.crop_size["height"]
    pix = torch.stack(
        [
            proc(im.resize((224, 224), Image.Resampling.LANCZOS), return_tensors="pt")[
                "pixel_values"
            ][0]
            if im is not None
            else torch.zeros(3, size, size)
            for im in images
        ]
    )
    with torch.no_grad():
        out = clip(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pix
        )
        w = {k: v for k, v in state.items() if k.startswith("encoder.image_")}
        image_cls = (
            out.image_embeds @ w["encoder.image_cls_fc.weight"].T + w["encoder.image_cls_fc.bias"]
        )
        image_tokens = (
            out.vision_model_output[0] @ w["encoder.image_tokens_fc.weight"].T
            + w["encoder.image_tokens_fc.bias"]
        )
    return out.text_embeds, out.text_model_output[0], image_cls, image_tokens


def test_official_checkpoint_round_trip(tiny_clip_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "mimic.ckpt"
    state = _official_checkpoint(tiny_clip_dir, ckpt)
    out = tmp_path / "converted"
    assert main(["--ckpt", str(ckpt), "--clip", str(tiny_clip_dir), "--out", str(out)]) == 0
    model = LinkingModel.from_pretrained(out)
    assert model.config.mimic.dt == 32 and model.config.mimic.dv == 8
    assert model.config.mimic.tglu_hidden_dim == 12

    rng = torch.Generator().manual_seed(0)

    def img() -> Image.Image:
        arr = (torch.rand(40, 50, 3, generator=rng) * 255).to(torch.uint8).numpy()
        return Image.fromarray(arr)

    m_texts = [mention_text("Turing", "Turing broke the code."), mention_text("Ada", "Ada wrote.")]
    m_imgs: list[Image.Image | None] = [img(), None]
    e_texts = [
        entity_text("Alan Turing", "Occupation: mathematician."),
        entity_text("Ada Lovelace", "Occupation: writer."),
        entity_text("Nobody", ""),
    ]
    e_imgs: list[Image.Image | None] = [img(), None, img()]
    with torch.no_grad():
        ours = model.matcher.score(
            model.encoder.encode(m_texts, m_imgs), model.encoder.encode(e_texts, e_imgs)
        )
    m_ref = _released_features(tiny_clip_dir, state, m_texts, m_imgs)
    e_ref = _released_features(tiny_clip_dir, state, e_texts, e_imgs)
    ref = torch.zeros(4, 2, 3)
    with torch.no_grad():
        for b in range(2):
            for n in range(3):
                ref[:, b, n] = torch.stack(
                    pair_scores(model.matcher, *(t[b] for t in m_ref), *(t[n] for t in e_ref))
                )
    for i, name in enumerate(["score", "tglu", "vdlu", "cmfu"]):
        torch.testing.assert_close(getattr(ours, name), ref[i], rtol=0, atol=1e-5)
    # the converted folder is self-contained and fingerprinted
    assert (out / "backbone" / "config.json").is_file()
    again = LinkingModel.from_pretrained(out)
    assert again.fingerprint() == model.fingerprint()


def test_conversion_without_saving_matches_saved(tiny_clip_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.ckpt"
    state = _official_checkpoint(tiny_clip_dir, ckpt)
    torch.save(state, tmp_path / "bare.pt")  # a bare state dict (no Lightning wrapper) works too
    a = convert_official_checkpoint(ckpt, tiny_clip_dir)
    b = convert_official_checkpoint(tmp_path / "bare.pt", tiny_clip_dir)
    assert a.fingerprint() == b.fingerprint()
