"""``mel-demo-request``: write a request body for a demo test mention and print a curl for it.

Picks the first test mention that has an image and whose gold entity the served pipeline
(FAISS top-k + MIMIC rerank, exactly what the server runs) puts first, writes its JSON body
next to the artifacts, and prints the ``curl`` that ``make demo`` shows. It also writes the same
request with ``reranker: "drin"`` (``<out stem>-drin.json``), answered once DRIN is loaded.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from models.data.schema import load_dataset
from models.preprocess import load_image_or_none
from service.linker import Linker
from service.primitives import LinkParams, MentionBatch, MentionInput
from service.settings import ServiceSettings


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mel-demo-request", description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--out", required=True, help="where to write the JSON request body")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tries", type=int, default=50)
    a = p.parse_args(argv)
    ds = load_dataset(a.data)
    linker = Linker(
        ServiceSettings(model_path=a.model, index_path=a.index, device="cpu", use_faiss_gpu=False)
    )
    chosen = None
    for m in [m for m in ds.split("test") if m.image and m.entity_id][: a.tries]:
        assert m.image is not None
        img = load_image_or_none(ds.resolve(m.image))
        item = MentionInput(m.mention, m.sentence, img)
        res, _ = linker.link(
            MentionBatch((item,), linker.encode([item])),
            [LinkParams(top_k=3, reranker=linker.default_reranker)],
        )
        if res[0].candidates and res[0].candidates[0].entity_id == m.entity_id:
            chosen = m
            break
    if chosen is None:
        print("no test mention among the first tries is linked correctly", file=sys.stderr)
        return 1
    assert chosen.image is not None
    body = {
        "mention": chosen.mention,
        "sentence": chosen.sentence,
        "top_k": 3,
        "explain": True,
        "image": base64.b64encode(ds.resolve(chosen.image).read_bytes()).decode(),
    }
    Path(a.out).write_text(json.dumps(body))
    drin_out = Path(a.out).with_name(Path(a.out).stem + "-drin.json")
    drin_out.write_text(json.dumps({**body, "reranker": "drin"}))
    print(
        f"\nDemo test mention {chosen.id}: {chosen.mention!r} in {chosen.sentence!r}"
        f"\n(gold entity {chosen.entity_id}; image {chosen.image})\n\nTry it:\n"
        f"  curl -s http://127.0.0.1:{a.port}/v1/link -H 'content-type: application/json' "
        f"-d @{a.out}\n"
    )
    print(
        f"Or open the playground: http://127.0.0.1:{a.port}/\n\n"
        "Once DRIN has trained in the background (GET /readyz lists it in 'rerankers'), the "
        "DRIN graph over the same candidates (explain = initial / final tt, ti, it, ii edge "
        f"weights):\n  curl -s http://127.0.0.1:{a.port}/v1/link "
        f"-H 'content-type: application/json' -d @{drin_out}\n"
    )
    linker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
