"""A batch's image tower beside its text tower (models/towers.py) against the towers in turn.

    python bench/towers.py [--data artifacts/demo-world] [--model artifacts/demo-model/best]
                           [--index artifacts/demo-index] [--reps 15]

Two ``Linker`` objects over the same model and index, planned as the server plans a 2-core box
(2 model workers x 1 thread), one with ``towers_beside`` and one without, encode the same
demo-world test mentions (their text and image, the server's ``Linker.encode``) in batches of
1, 4 and 32, taking turns within each rep. Reports the median ms per batch, the ratio, and the
largest difference of the features (bit-identical expected: same computations, other thread).
Run it alone: it measures what a second core does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py

from models.data.schema import load_dataset
from models.preprocess import load_image_or_none
from service.linker import Linker
from service.primitives import MentionInput
from service.settings import ServiceSettings

OUT = Path(__file__).resolve().parent / "results" / "towers.json"
BATCHES = (1, 4, 32)


def _items(data: str, n: int) -> list[MentionInput]:
    ds = load_dataset(data)
    out = []
    for m in ds.split("test"):
        if m.image is None:
            continue
        img = load_image_or_none(ds.resolve(m.image))
        if img is not None:
            out.append(MentionInput(m.mention, m.sentence, img, m.id, m.span))
        if len(out) == n:
            break
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    base = {
        "model_path": a.model,
        "index_path": a.index,
        "device": "cpu",
        "use_faiss_gpu": False,
        "model_workers": 2,
        "intra_op_threads": 1,
    }
    sides = {
        "in_turn": Linker(ServiceSettings(**base, towers_beside=False)),
        "beside": Linker(ServiceSettings(**base, towers_beside=True)),
    }
    assert sides["beside"].towers is not None and sides["in_turn"].towers is None
    items = _items(a.data, max(BATCHES))
    rows = []
    for b in BATCHES:
        batch = items[:b]
        feats = {k: s.encode(batch) for k, s in sides.items()}  # warm-up and the equality
        diff = max(
            float(
                (getattr(feats["beside"].mimic, f) - getattr(feats["in_turn"].mimic, f)).abs().max()
            )
            for f in ("text_cls", "text_tokens", "image_cls", "image_tokens")
        )
        times: dict[str, list[float]] = {k: [] for k in sides}
        reps = a.reps if b < 32 else max(3, a.reps // 3)
        for r in range(reps):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for k in order:
                t0 = time.perf_counter()
                sides[k].encode(batch)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "batch": b,
                "ms": {k: 1e3 * v for k, v in med.items()},
                "speedup": med["in_turn"] / med["beside"],
                "max_abs_diff": diff,
                "reps": reps,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    for s in sides.values():
        s.close()
    return {"rows": rows, "items_with_images": len(items)}


def render(res: dict[str, Any]) -> str:
    lines = [
        "# Image tower beside the text tower (bench/towers.py)",
        "",
        "The server's `Linker.encode` on demo-world test mentions with their images, planned as "
        "on this 2-core box (2 model workers x 1 thread): `MEL_TOWERS_BESIDE=true` (the image "
        "tower on a helper thread while the text tower runs, when a core of the budget is free) "
        "against `false` (the towers in turn, as before); the two taking turns within each rep, "
        "median ms per encoded batch.",
        "",
        "| batch | towers in turn ms | beside ms | speed-up | max abs feature diff |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['batch']} | {r['ms']['in_turn']:.1f} | {r['ms']['beside']:.1f} | "
            f"{r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |"
        )
    lines += [
        "",
        "What it means for a server: a batch borrows the second core only while no other batch "
        "holds it (models/towers.py), so the gain is at low load (a lone request, a batch call "
        "on an idle server); with every worker busy the towers run in turn, as before. The "
        "service-level effect is measured in `service-ab-towers.md`.",
        "",
        _machine.line(res["machine"], ("torch", "onnxruntime")),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="artifacts/demo-world")
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--index", default="artifacts/demo-index")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    res = run(a)
    res["machine"] = _machine.machine_info(
        ("torch", "onnxruntime"), reps=a.reps, loadavg=round(os.getloadavg()[0], 2)
    )
    print(_machine.write_results(Path(a.out), res, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
