"""The HTTP service, through real HTTP (uvicorn on a free loopback port), tiny model + index."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from PIL import Image

from index.build import BuildConfig, build
from index.search import IndexSearcher
from models.drin_features import (
    DrinReranker,
    DrinRerankerConfig,
    mention_parts,
    span_token_mask,
)
from models.model import LinkingModel
from service.app import create_app
from service.linker import Linker
from service.settings import ServiceSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(
    settings: ServiceSettings, linker_factory: Any = Linker, wait_ready: bool = True
) -> Iterator[tuple[str, uvicorn.Server]]:
    port = _free_port()
    app = create_app(settings, linker_factory)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=10
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    if wait_ready:
        while time.monotonic() < deadline:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(httpx.get(f"{base}/readyz").text)
    try:
        yield base, server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _settings(artifacts: tuple[Path, Path], **kw: Any) -> ServiceSettings:
    return ServiceSettings(
        model_path=str(artifacts[0]),
        index_path=str(artifacts[1]),
        device="cpu",
        use_faiss_gpu=False,
        **kw,
    )


def _png(colour: tuple[int, int, int] = (220, 30, 30), size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def server(artifacts: tuple[Path, Path]) -> Iterator[str]:
    with serve(
        _settings(
            artifacts,
            max_batch_items=4,
            max_image_bytes=200_000,
            max_image_pixels=1_000_000,
            max_body_bytes=2_000_000,
            max_request_pixels=1_500_000,
            nil_threshold=1e9,
        )
    ) as (base, _):
        yield base


def test_link_json_with_and_without_image(server: str) -> None:
    body = {
        "mention": "Jo Ames",
        "sentence": "Jo Ames the painter spoke.",
        "top_k": 3,
        "image": _b64(_png()),
        "explain": True,
    }
    r = httpx.post(f"{server}/v1/link", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["rank"] for c in out["candidates"]] == [1, 2, 3]
    assert set(out["candidates"][0]["explain"]) == {"tglu", "vdlu", "cmfu"}
    scores = [c["score"] for c in out["candidates"]]
    assert scores == sorted(scores, reverse=True)
    assert out["nil"] is True  # nil_threshold=1e9: every best score is under it
    assert out["model_version"] and out["index_version"]
    assert out["timings"]["encode_ms"] > 0 and not out["timings"]["cached"]
    # data URI form, no-image form, retrieval-only form
    body["image"] = "data:image/png;base64," + _b64(_png((10, 200, 10)))
    assert httpx.post(f"{server}/v1/link", json=body, timeout=30).status_code == 200
    body.pop("image")
    r = httpx.post(f"{server}/v1/link", json={**body, "reranker": "none"}, timeout=30)
    cands = r.json()["candidates"]
    assert [c["score"] for c in cands] == [c["retrieval_score"] for c in cands]
    # the same request again is answered from the result cache
    again = httpx.post(f"{server}/v1/link", json={**body, "reranker": "none"}, timeout=30)
    assert again.json()["timings"]["cached"] is True
    assert again.json()["candidates"] == cands


def test_multipart_and_entities(server: str) -> None:
    r = httpx.post(
        f"{server}/v1/link/form",
        data={"mention": "Jo Bell", "sentence": "Jo Bell the pilot", "top_k": "2"},
        files={"image": ("x.png", _png(), "image/png")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["candidates"]) == 2
    eid = r.json()["candidates"][0]["entity_id"]
    ent = httpx.get(f"{server}/v1/entities/{eid}").json()
    assert ent["id"] == eid and ent["name"].startswith("Jo ")
    miss = httpx.get(f"{server}/v1/entities/nope")
    assert miss.status_code == 404 and miss.json()["error"]["code"] == "entity_not_found"


def test_batch_keeps_order_and_isolates_bad_items(server: str) -> None:
    items = [
        {"mention": "Jo Ames", "sentence": "the painter", "top_k": 1},
        {"mention": "Jo Cole", "sentence": "x", "image": "%%%not base64"},
        {"sentence": "no mention"},
        {"mention": "Jo Dunn", "sentence": "the singer", "top_k": 2},
    ]
    r = httpx.post(f"{server}/v1/link/batch", json={"items": items}, timeout=30)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res[0]["result"]["candidates"]) == 1
    assert res[1]["error"]["code"] == "bad_image_encoding"
    assert res[2]["error"]["code"] == "invalid_request"
    assert len(res[3]["result"]["candidates"]) == 2
    too_many = httpx.post(f"{server}/v1/link/batch", json={"items": items + items[:1]})
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "batch_too_large"


def test_batch_items_reach_the_model_as_one_group(server: str) -> None:
    # images of very different sizes decode in different times; the batch still reaches the
    # model as one group (every item reports the same model batch of 4), not item by item
    def noise_jpeg(side: int, seed: int) -> bytes:  # noise: a big one decodes slowly
        g = torch.Generator().manual_seed(seed)
        px = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="JPEG", quality=60)
        return buf.getvalue()

    sides = [560, 16, 480, 24]
    items = [
        {
            "mention": f"Jo Group{i}",
            "sentence": f"Jo Group{i} arrived in the batch.",
            "image": _b64(noise_jpeg(side, i)),
        }
        for i, side in enumerate(sides)
    ]
    r = httpx.post(f"{server}/v1/link/batch", json={"items": items}, timeout=60)
    assert r.status_code == 200, r.text
    timings = [x["result"]["timings"] for x in r.json()["results"]]
    assert [t["cached"] for t in timings] == [False] * 4
    assert [t["batch_size"] for t in timings] == [4] * 4
    assert all(t["decode_ms"] > 0 for t in timings)


@pytest.mark.parametrize(
    ("patch", "status", "code"),
    [
        ({"mention": "x" * 301}, 422, "mention_too_long"),
        ({"sentence": "y" * 5001}, 422, "sentence_too_long"),
        ({"top_k": 101}, 422, "top_k_out_of_range"),
        ({"top_k": 0}, 422, "invalid_request"),
        ({"candidates_k": 5000}, 422, "candidates_k_out_of_range"),
        ({"reranker": "bogus"}, 422, "invalid_request"),
        ({"unknown_field": 1}, 422, "invalid_request"),
        ({"image": _b64(b"\x00" * 300_000)}, 413, "image_too_large"),
        ({"image": _b64(b"definitely not an image")}, 422, "bad_image"),
        ({"image_url": "http://example.com/a.png"}, 403, "image_url_disabled"),
        ({"reranker": "drin"}, 422, "reranker_unavailable"),  # this server has no DRIN model
        ({"span": [0, 99]}, 422, "bad_span"),
        ({"span": [3, 3]}, 422, "bad_span"),
        ({"span": [1, 2, 3]}, 422, "invalid_request"),
    ],
)
def test_limits_answer_clear_4xx(
    server: str, patch: dict[str, Any], status: int, code: str
) -> None:
    body = {"mention": "Jo Ames", "sentence": "s", **patch}
    r = httpx.post(f"{server}/v1/link", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert httpx.get(f"{server}/healthz").status_code == 200  # the server stays up


def test_format_bomb_and_body_limits(server: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    r = httpx.post(
        f"{server}/v1/link", json={"mention": "a", "sentence": "b", "image": _b64(buf.getvalue())}
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_image_format"
    # decompression bomb: a tiny PNG that decodes to 4000 x 4000 pixels
    bomb = _png((0, 0, 0), (4000, 4000))
    assert len(bomb) < 200_000
    r = httpx.post(f"{server}/v1/link", json={"mention": "a", "sentence": "b", "image": _b64(bomb)})
    assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_many_pixels"
    r = httpx.post(
        f"{server}/v1/link",
        content=b"{" + b" " * 2_100_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(
        f"{server}/v1/link", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422


def test_metrics_and_health(server: str) -> None:
    httpx.post(f"{server}/v1/link", json={"mention": "Jo Ames", "sentence": "m"}, timeout=30)
    text = httpx.get(f"{server}/metrics").text
    for stage in ("decode", "encode", "retrieve", "rerank", "total"):
        assert f'mel_stage_seconds_count{{stage="{stage}"}}' in text
    assert "mel_batch_size_count" in text and "mel_queue_depth" in text
    assert 'mel_cache_requests_total{kind="result",outcome="miss"}' in text
    assert 'mel_errors_total{type="mention_too_long"}' in text or "mel_errors_total" in text
    ready = httpx.get(f"{server}/readyz").json()
    assert ready["ready"] and ready["entities"] == 16 and ready["redis"] == {"configured": False}
    assert ready["drin_table_rows"] is None  # no DRIN model here
    # the image tower may go beside the text tower when the plan has a second worker's core
    assert ready["towers_beside"] is (ready["model_workers"] >= 2)
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/link", "/v1/link/form", "/v1/link/batch", "/v1/entities/{entity_id}"} <= set(
        schema["paths"]
    )


def test_api_keys(artifacts: tuple[Path, Path]) -> None:
    with serve(_settings(artifacts, api_keys=["s3cret"])) as (base, _):
        body = {"mention": "Jo Ames", "sentence": "s"}
        r = httpx.post(f"{base}/v1/link", json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert (
            httpx.post(f"{base}/v1/link", json=body, headers={"X-API-Key": "wrong"}).status_code
            == 401
        )
        assert (
            httpx.post(
                f"{base}/v1/link", json=body, headers={"X-API-Key": "s3cret"}, timeout=30
            ).status_code
            == 200
        )
        assert (
            httpx.post(
                f"{base}/v1/link", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30
            ).status_code
            == 200
        )
        assert httpx.get(f"{base}/healthz").status_code == 200  # probes need no key


def test_readiness_before_and_after_warmup(artifacts: tuple[Path, Path]) -> None:
    release = threading.Event()

    def slow_linker(settings: ServiceSettings) -> Linker:
        release.wait(30)
        return Linker(settings)

    with serve(_settings(artifacts), slow_linker, wait_ready=False) as (base, _):
        assert httpx.get(f"{base}/healthz").status_code == 200
        r = httpx.get(f"{base}/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        link = httpx.post(f"{base}/v1/link", json={"mention": "a", "sentence": "b"})
        assert link.status_code == 503 and link.json()["error"]["code"] == "not_ready"
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "mel_ready 1.0" in httpx.get(f"{base}/metrics").text


@pytest.fixture
def redis_server() -> Iterator[dict[str, Any]]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed")
    port = _free_port()
    info: dict[str, Any] = {"port": port, "proc": None}

    def start() -> None:
        info["proc"] = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop() -> None:
        if info["proc"] is not None:
            info["proc"].kill()
            info["proc"].wait(10)
            info["proc"] = None

    info["start"], info["stop"] = start, stop
    start()
    yield info
    stop()


def test_redis_killed_and_restarted_without_failed_requests(
    artifacts: tuple[Path, Path], redis_server: dict[str, Any]
) -> None:
    url = f"redis://127.0.0.1:{redis_server['port']}/0"
    with serve(_settings(artifacts, redis_url=url, redis_retry_s=0.3)) as (base, _):
        assert httpx.get(f"{base}/readyz").json()["redis"] == {"configured": True, "up": True}
        body = {"mention": "Jo Cole", "sentence": "the chemist", "top_k": 2}
        first = httpx.post(f"{base}/v1/link", json=body, timeout=30)
        assert first.status_code == 200
        assert httpx.post(f"{base}/v1/link", json=body, timeout=30).json()["timings"]["cached"]
        redis_server["stop"]()
        for i in range(5):  # Redis is gone: every request still succeeds, uncached
            r = httpx.post(f"{base}/v1/link", json={**body, "sentence": f"s{i}"}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["candidates"]
        assert httpx.get(f"{base}/readyz").json()["redis"]["up"] is False
        assert "mel_cache_errors_total" in httpx.get(f"{base}/metrics").text
        redis_server["start"]()
        time.sleep(0.4)  # past redis_retry_s: the next call tries Redis again
        deadline = time.monotonic() + 10
        while not httpx.get(f"{base}/readyz").json()["redis"]["up"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        fresh = {**body, "sentence": "after restart"}
        assert httpx.post(f"{base}/v1/link", json=fresh, timeout=30).status_code == 200
        assert httpx.post(f"{base}/v1/link", json=fresh, timeout=30).json()["timings"]["cached"]


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
            return
        raw = _png((30, 30, 220))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


def test_image_urls_refuse_private_targets(artifacts: tuple[Path, Path]) -> None:
    img_server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=img_server.serve_forever, daemon=True).start()
    port = img_server.server_address[1]
    body = {"mention": "Jo Dunn", "sentence": "s"}
    try:
        with serve(_settings(artifacts, allow_image_urls=True)) as (base, _):
            for url in (
                f"http://127.0.0.1:{port}/img.png",
                f"http://localhost:{port}/img.png",
                "http://169.254.169.254/latest/meta-data",
                "http://[::1]/x.png",
                "http://10.0.0.1/x.png",
            ):
                r = httpx.post(f"{base}/v1/link", json={**body, "image_url": url}, timeout=30)
                assert r.status_code == 403, (url, r.text)
                assert r.json()["error"]["code"] == "image_url_forbidden"
            for url in ("ftp://example.com/x.png", "file:///etc/passwd"):
                r = httpx.post(f"{base}/v1/link", json={**body, "image_url": url}, timeout=30)
                assert r.status_code == 403
        # an intranet deployment may allow private targets: then fetching (and redirects) work
        with serve(_settings(artifacts, allow_image_urls=True, url_allow_private=True)) as (
            base,
            _,
        ):
            r = httpx.post(
                f"{base}/v1/link",
                json={**body, "image_url": f"http://127.0.0.1:{port}/redirect"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
    finally:
        img_server.shutdown()


def test_graceful_shutdown_finishes_in_flight_requests(artifacts: tuple[Path, Path]) -> None:
    results: list[int] = []
    slow = threading.Event()

    class SlowLinker(Linker):
        def link(self, feats: Any, params: Any) -> Any:
            slow.set()
            time.sleep(1.0)
            return super().link(feats, params)

    with serve(_settings(artifacts), SlowLinker) as (base, server):
        slow.clear()  # the warm-up went through link() too

        def call() -> None:
            r = httpx.post(
                f"{base}/v1/link", json={"mention": "Jo Ames", "sentence": "late"}, timeout=30
            )
            results.append(r.status_code)

        t = threading.Thread(target=call)
        t.start()
        assert slow.wait(10)
        server.should_exit = True  # SIGTERM: stop accepting, finish what is in flight
        t.join(30)
    assert results == [200]


def test_service_does_not_import_training_code() -> None:
    code = (
        "import sys, service.app, service.linker, service.cli, service.pipeline; "
        "bad = [m for m in sys.modules if m in ('models.train', 'models.evaluate', "
        "'models.drin_train', 'models.features', 'models.data.demo_world', "
        "'models.data.converters', 'models.data_cli')]; "
        "print(json.dumps(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ---------------------------------------------------------------------- DRIN over HTTP
@pytest.fixture(scope="module")
def drin_server(artifacts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = LinkingModel.from_pretrained(artifacts[0])
    torch.manual_seed(11)
    drin = DrinReranker(DrinRerankerConfig.for_backbone(model.encoder.backbone, hidden=16))
    folder = tmp_path_factory.mktemp("drin") / "ckpt"
    drin.save_pretrained(
        folder, meta={"backbone_weights": model.encoder.backbone.weights_fingerprint()}
    )
    with serve(_settings(artifacts, drin_model_path=str(folder))) as (base, _):
        yield base, folder


def _direct_drin(
    artifacts: tuple[Path, Path], folder: Path, mention: str, sentence: str, image: bytes | None
) -> tuple[list[str], list[float]]:
    """DRIN computed directly from the components, for the server's own candidates."""
    model = LinkingModel.from_pretrained(artifacts[0])
    drin = DrinReranker.from_pretrained(folder)
    searcher = IndexSearcher(artifacts[1], model.fingerprint())
    img = Image.open(io.BytesIO(image)).convert("RGB") if image else None
    with torch.inference_mode():
        enc = model.encoder
        text = enc.text_features([f"{mention} [SEP] {sentence}"])
        feats = enc.image_features([img])
        queries = model.matcher.retrieval_queries(enc.project(text, feats))
        cand = searcher.search(queries.numpy(), 16)
        mask = span_token_mask(enc.backbone.tokenizer, [mention], [sentence], [None])
        m = mention_parts(enc.backbone, text, feats, mask, torch.tensor([img is not None]))
        out = drin(m, searcher.drin_parts(cand.rows))
    scores = out.scores[0]
    order = torch.argsort(-scores, stable=True)
    ids = [searcher.entity(int(cand.rows[0, j]))["id"] for j in order]
    searcher.close()
    return ids, scores[order].tolist()


def test_drin_round_trip_matches_direct_computation(
    drin_server: tuple[str, Path], artifacts: tuple[Path, Path]
) -> None:
    base, folder = drin_server
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["rerankers"] == ["mimic", "drin", "none"] and ready["drin_version"]
    assert ready["drin_table_rows"] == ready["entities"] == 16  # the KB folded at load
    for image in (_png((30, 30, 220)), None):
        body: dict[str, Any] = {
            "mention": "Jo Cole",
            "sentence": "Jo Cole the chemist spoke.",
            "reranker": "drin",
            "top_k": 16,
            "candidates_k": 16,
            "explain": True,
        }
        if image is not None:
            body["image"] = _b64(image)
        r = httpx.post(f"{base}/v1/link", json=body, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["reranker"] == "drin"
        ids, scores = _direct_drin(artifacts, folder, body["mention"], body["sentence"], image)
        assert [c["entity_id"] for c in out["candidates"]] == ids
        # float16 storage of the entity parts and of the cached mention parts
        assert [c["score"] for c in out["candidates"]] == pytest.approx(scores, abs=2e-2)
        ex = out["candidates"][0]["explain"]
        assert set(ex) == {"edges_initial", "edges_final"}
        assert set(ex["edges_initial"]) == set(ex["edges_final"]) == {"tt", "ti", "it", "ii"}
        assert all(0 < v < 1 for v in ex["edges_final"].values())  # sigmoid outputs
        if image is None:  # no mention image: the edges that start from it are 0
            assert all(
                c["explain"]["edges_initial"]["it"] == 0 == c["explain"]["edges_initial"]["ii"]
                for c in out["candidates"]
            )
    # an explicit span equal to the found occurrence changes nothing
    body.pop("image", None)
    first = httpx.post(f"{base}/v1/link", json=body, timeout=30).json()["candidates"]
    spanned = httpx.post(f"{base}/v1/link", json={**body, "span": [0, 7]}, timeout=30).json()
    assert [c["score"] for c in spanned["candidates"]] == pytest.approx(
        [c["score"] for c in first], abs=1e-6
    )


def test_drin_batch_mixes_rerankers_and_counts_metrics(drin_server: tuple[str, Path]) -> None:
    base, _ = drin_server
    items = [
        {"mention": "Jo Bell", "sentence": "Jo Bell the pilot", "reranker": "drin", "top_k": 3},
        {"mention": "Jo Bell", "sentence": "Jo Bell the pilot", "reranker": "mimic", "top_k": 3},
        {"mention": "Jo Bell", "sentence": "Jo Bell the pilot", "reranker": "drin", "span": [9]},
        {"mention": "Jo Dunn", "sentence": "x", "reranker": "drin", "candidates_k": 1, "top_k": 1},
    ]
    r = httpx.post(f"{base}/v1/link/batch", json={"items": items}, timeout=30)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["result"]["reranker"] == "drin" and res[1]["result"]["reranker"] == "mimic"
    assert len(res[0]["result"]["candidates"]) == 3
    assert res[2]["error"]["code"] == "invalid_request"
    assert len(res[3]["result"]["candidates"]) == 1  # K = 1: a one-candidate graph
    form = httpx.post(
        f"{base}/v1/link/form",
        data={
            "mention": "Jo Bell",
            "sentence": "I met Jo Bell.",
            "reranker": "drin",
            "span_start": "6",
            "span_end": "13",
        },
        timeout=30,
    )
    assert form.status_code == 200, form.text
    half = httpx.post(
        f"{base}/v1/link/form",
        data={"mention": "Jo Bell", "sentence": "I met Jo Bell.", "span_start": "6"},
        timeout=30,
    )
    assert half.status_code == 422 and half.json()["error"]["code"] == "bad_span"
    text = httpx.get(f"{base}/metrics").text
    assert 'mel_rerank_seconds_count{reranker="drin"}' in text
    assert 'mel_mentions_total{reranker="drin"}' in text


def test_drin_model_needs_drin_fields_in_the_index(
    artifacts: tuple[Path, Path], tiny_world: Path, tmp_path: Path, drin_server: tuple[str, Path]
) -> None:
    build(
        BuildConfig(
            kb=str(tiny_world / "kb.jsonl"),
            model=str(artifacts[0]),
            out=str(tmp_path / "nodrin"),
            chunk_size=8,
            batch_size=8,
            workers=2,
            progress=False,
            device="cpu",
            drin_fields=False,
        )
    )
    settings = ServiceSettings(
        model_path=str(artifacts[0]),
        index_path=str(tmp_path / "nodrin"),
        drin_model_path=str(drin_server[1]),
        device="cpu",
        use_faiss_gpu=False,
    )
    with pytest.raises(ValueError, match="no-drin"):
        Linker(settings)


# ---------------------------------------------------------------------- probe defects
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels (no pixel data follows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_chunked_body_over_the_limit_is_413(server: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"mention": "a", "sentence": "'
        for _ in range(30):
            yield b"x" * 100_000  # 3 MB in all, over max_body_bytes = 2 MB
        yield b'"}'

    r = httpx.post(
        f"{server}/v1/link",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def small() -> Iterator[bytes]:  # a chunked body under the limit goes through unchanged
        yield b'{"mention": "Jo Ames", '
        yield b'"sentence": "the painter", "top_k": 2}'

    ok = httpx.post(
        f"{server}/v1/link", content=small(), headers={"content-type": "application/json"}
    )
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["candidates"]) == 2


@pytest.mark.parametrize(
    "body",
    [
        b'{"mention": "\xff\xfe", "sentence": "s"}',  # invalid UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested past the JSON parser's depth
    ],
    ids=["invalid-utf8", "deep-json"],
)
def test_unparseable_json_is_422(server: str, body: bytes) -> None:
    r = httpx.post(f"{server}/v1/link", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_body"


def test_image_errors_are_clear(server: str) -> None:
    link = f"{server}/v1/link"
    # bytes that are no image: the message names no Python object or heap address
    r = httpx.post(link, json={"mention": "a", "sentence": "a", "image": "aGVsbG8gd29ybGQ="})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_image"
    assert "0x" not in r.text and "BytesIO" not in r.text
    # a bomb past Pillow's own limit (2 x 89.5 M pixels) is a pixel error, not a bad image
    bomb = _png_header(20_000, 10_000)
    r = httpx.post(link, json={"mention": "a", "sentence": "a", "image": _b64(bomb)})
    assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_many_pixels"
    # base64 wrapped at 76 columns (the base64 tool's default) is standard MIME base64
    wrapped = base64.encodebytes(_png((200, 10, 10), (64, 64))).decode()
    assert "\n" in wrapped.strip()
    r = httpx.post(link, json={"mention": "Jo Ames", "sentence": "s", "image": wrapped})
    assert r.status_code == 200, r.text


def test_pixel_budget_covers_a_batchs_images(server: str) -> None:
    mega = _b64(_png((5, 5, 5), (1000, 1000)))  # 1 M pixels: within max_image_pixels
    item = {"mention": "Jo Ames", "sentence": "s", "image": mega, "top_k": 1}
    assert httpx.post(f"{server}/v1/link", json=item, timeout=30).status_code == 200
    # two such images: 2 M pixels over the request budget of 1.5 M, refused before decoding
    r = httpx.post(f"{server}/v1/link/batch", json={"items": [item, item]}, timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "pixel_budget_exceeded"
    # a bad item does not count against the budget and still fails alone
    bad = {**item, "image": "%%%"}
    r = httpx.post(f"{server}/v1/link/batch", json={"items": [item, bad]}, timeout=30)
    assert r.status_code == 200
    assert [("result" if x["result"] else x["error"]["code"]) for x in r.json()["results"]] == [
        "result",
        "bad_image_encoding",
    ]


def test_cached_batch_items_and_not_found_codes(server: str) -> None:
    item = {"mention": "Jo Dunn", "sentence": "cached twice", "top_k": 1}
    first = httpx.post(f"{server}/v1/link/batch", json={"items": [item]}, timeout=30).json()
    again = httpx.post(f"{server}/v1/link/batch", json={"items": [item]}, timeout=30).json()
    assert again["results"][0]["result"]["timings"]["cached"] is True
    assert (
        again["results"][0]["result"]["candidates"] == first["results"][0]["result"]["candidates"]
    )
    r = httpx.get(f"{server}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server}/v1/link")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]


def test_openapi_documents_every_status_a_route_answers(server: str) -> None:
    paths = httpx.get(f"{server}/openapi.json").json()["paths"]

    def statuses(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert {"200", "400", "401", "403", "413", "415", "422", "429", "503", "504"} <= statuses(
        "/v1/link", "post"
    )
    assert {"200", "401", "413", "415", "422", "429", "503", "504"} <= statuses(
        "/v1/link/form", "post"
    )
    assert {"200", "401", "413", "422", "503"} <= statuses("/v1/link/batch", "post")
    assert {"200", "401", "404", "503"} <= statuses("/v1/entities/{entity_id}", "get")
    assert {"200", "503"} <= statuses("/readyz", "get")


class _SlowLinker(Linker):
    delay_s = 0.6

    def link(self, feats: Any, params: Any) -> Any:
        time.sleep(self.delay_s)
        return super().link(feats, params)


def test_full_queue_is_429_and_a_late_answer_is_504(artifacts: tuple[Path, Path]) -> None:
    settings = _settings(artifacts, queue_size=1, max_batch_size=1, warmup=False)
    with serve(settings, _SlowLinker) as (base, _):
        codes: list[tuple[int, str | None, str | None]] = []

        def call(i: int) -> None:
            r = httpx.post(
                f"{base}/v1/link", json={"mention": "Jo Ames", "sentence": f"q{i}"}, timeout=30
            )
            err = r.json().get("error")
            codes.append(
                (r.status_code, err["code"] if err else None, r.headers.get("retry-after"))
            )

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # one in the model, one queued; the rest found the queue full (and when to retry)
        assert len(codes) == 6 and set(codes) <= {(200, None, None), (429, "overloaded", "1")}
        assert (429, "overloaded", "1") in codes and (200, None, None) in codes
    with serve(_settings(artifacts, request_timeout_s=0.2, warmup=False), _SlowLinker) as (
        base,
        _,
    ):
        r = httpx.post(f"{base}/v1/link", json={"mention": "Jo Ames", "sentence": "late"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert httpx.get(f"{base}/healthz").status_code == 200


def test_nil_flips_at_the_threshold(artifacts: tuple[Path, Path]) -> None:
    from service.primitives import LinkParams, MentionBatch, MentionInput

    linker = Linker(_settings(artifacts))
    item = MentionInput("Jo Bell", "Jo Bell the pilot")
    feats = MentionBatch((item,), linker.encode([item]))
    best = linker.link(feats, [LinkParams(top_k=1)])[0][0].candidates[0].score
    for thr, nil in ((best - 1e-3, False), (best, False), (best + 1e-3, True), (None, False)):
        linker.nil_threshold = thr  # what MEL_NIL_THRESHOLD sets (no fusion model here)
        assert linker.link(feats, [LinkParams(top_k=1)])[0][0].nil is nil, thr
    linker.close()


def test_towers_beside_encode_the_same_features(artifacts: tuple[Path, Path]) -> None:
    """Images encoded on a helper thread beside the texts (a free core: 2 workers x 1 thread)
    give bit-identical features to the towers in turn (MEL_TOWERS_BESIDE=false)."""
    from service.primitives import MentionInput

    img = Image.new("RGB", (48, 40), (200, 30, 90))
    items = [
        MentionInput("Jo Bell", "Jo Bell the pilot", img, "jo"),
        MentionInput("Jo Ames", "Jo Ames, without a picture"),
    ]
    plan = {"model_workers": 2, "intra_op_threads": 1}
    beside = Linker(_settings(artifacts, **plan))
    in_turn = Linker(_settings(artifacts, **plan, towers_beside=False))
    one_core = Linker(_settings(artifacts, model_workers=1, intra_op_threads=1))
    assert beside.towers is not None and in_turn.towers is None and one_core.towers is None
    a, b = beside.encode(items), in_turn.encode(items)
    for f in ("text_cls", "text_tokens", "image_cls", "image_tokens"):
        assert torch.equal(getattr(a.mimic, f), getattr(b.mimic, f)), f
    assert beside.towers.beside == 1
    beside.encode(items[1:])  # no image to encode: nothing lent
    assert (beside.towers.beside, beside.towers.in_turn) == (1, 1)
    for linker in (beside, in_turn, one_core):
        linker.close()


def test_encoding_cache_blob_round_trip(
    artifacts: tuple[Path, Path], drin_server: tuple[str, Path]
) -> None:
    from service.primitives import MentionInput

    for drin in (None, str(drin_server[1])):
        linker = Linker(_settings(artifacts, drin_model_path=drin))
        items = [
            MentionInput("Jo Bell", "Jo Bell the pilot", Image.new("RGB", (20, 20), (9, 90, 200))),
            MentionInput("Jo Cole", "I met Jo Cole.", None, None, (6, 13)),
        ]
        feats = linker.encode(items)
        blobs = linker.pack(feats)
        assert len(blobs) == 2 and len({len(b) for b in blobs}) == 1
        back = linker.unpack(blobs)
        assert (back.drin is None) == (drin is None)
        groups = [(feats.mimic, back.mimic)] + ([(feats.drin, back.drin)] if drin else [])
        for a, b in groups:
            for name in a.__dataclass_fields__:
                x, y = getattr(a, name), getattr(b, name)
                assert x.shape == y.shape, name
                # float16 storage: relative error under 2^-10 of each value's magnitude
                assert torch.allclose(x, y, rtol=2e-3, atol=1e-4), name
        linker.close()


def start_cli(model: Path, index: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``mel-serve`` (service.cli) in a subprocess on a free port, once it is ready."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
            "--model",
            str(model),
            "--index",
            str(index),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**__import__("os").environ, "MEL_DEVICE": "cpu", "MEL_USE_FAISS_GPU": "false"},
        cwd=Path(__file__).resolve().parents[1],
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("mel-serve did not get ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def test_sigterm_drain_exits_zero(artifacts: tuple[Path, Path]) -> None:
    proc, base = start_cli(*artifacts)
    try:
        body = {"mention": "Jo Ames", "sentence": "before the drain"}
        assert httpx.post(f"{base}/v1/link", json=body, timeout=30).status_code == 200
        proc.send_signal(__import__("signal").SIGTERM)
        assert proc.wait(30) == 0  # a clean drain is a clean exit, not 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_redis_gauge_follows_redis_without_readyz(
    artifacts: tuple[Path, Path], redis_server: dict[str, Any]
) -> None:
    url = f"redis://127.0.0.1:{redis_server['port']}/0"
    settings = _settings(artifacts, redis_url=url, redis_retry_s=0.2, redis_health_interval_s=0.2)

    def gauge(base: str) -> float:
        for line in httpx.get(f"{base}/metrics").text.splitlines():
            if line.startswith("mel_redis_up "):
                return float(line.split()[1])
        raise AssertionError("no mel_redis_up")

    def wait_for(base: str, value: float) -> None:
        deadline = time.monotonic() + 10
        while gauge(base) != value:
            assert time.monotonic() < deadline, f"mel_redis_up never read {value}"
            time.sleep(0.05)

    with serve(settings, wait_ready=True) as (base, _):
        assert gauge(base) == 1
        redis_server["stop"]()
        wait_for(base, 0)  # no request, no /readyz: the health ping noticed
        redis_server["start"]()
        wait_for(base, 1)
        body = {"mention": "Jo Ames", "sentence": "gauge"}
        assert httpx.post(f"{base}/v1/link", json=body, timeout=30).status_code == 200
        assert httpx.post(f"{base}/v1/link", json=body, timeout=30).json()["timings"]["cached"]


class _ThreadsLinker(Linker):
    """Records the thread of each image transform and of each encode, and what encode got."""

    def __init__(self, settings: ServiceSettings) -> None:
        super().__init__(settings)
        self.seen: list[tuple[str, str, bool]] = []
        backbone = self.model.encoder.backbone
        transform = backbone.image_transform

        def recorded(img: Image.Image) -> torch.Tensor:
            self.seen.append(("transform", threading.current_thread().name, True))
            return transform(img)

        backbone.image_transform = recorded

    def encode(self, items: Any, beside: bool = True) -> Any:
        for it in items:
            self.seen.append(("encode", threading.current_thread().name, it.pixels is not None))
        return super().encode(items, beside)


@pytest.mark.parametrize("beside", [False, True])
def test_where_images_are_resized(artifacts: tuple[Path, Path], beside: bool) -> None:
    """The transform (LANCZOS resize, normalisation) never holds up the model thread before
    its text tower: with the image tower beside the text tower (models/towers.py) it runs
    with the image tower, on the helper thread, in the text tower's shadow; without, on the
    decode threads, and the model thread gets the pixels. Single and batch calls alike."""
    holder: list[_ThreadsLinker] = []

    def factory(settings: ServiceSettings) -> _ThreadsLinker:
        holder.append(_ThreadsLinker(settings))
        return holder[-1]

    settings = _settings(
        artifacts, warmup=False, towers_beside=beside, model_workers=2, intra_op_threads=1
    )
    with serve(settings, factory) as (base, _):
        one = {"mention": "Jo Bell", "sentence": "Jo Bell the pilot", "image": _b64(_png())}
        assert httpx.post(f"{base}/v1/link", json=one, timeout=30).status_code == 200
        items = [{**one, "image": _b64(_png((i, 2 * i, 90)))} for i in range(3)]
        r = httpx.post(f"{base}/v1/link/batch", json={"items": items}, timeout=30)
        assert r.status_code == 200 and all("result" in x for x in r.json()["results"])
    linker = holder[0]
    assert (linker.towers is not None) is beside
    seen = linker.seen
    transforms = [name for kind, name, _ in seen if kind == "transform"]
    encodes = [(name, px) for kind, name, px in seen if kind == "encode"]
    assert len(transforms) == 4 and len(encodes) == 4
    assert all(name.startswith("mel-model") for name, _ in encodes)
    if beside:  # idle server: every batch had a spare core for its image tower
        assert all(name.startswith("mel-tower") for name in transforms), transforms
        assert not any(px for _, px in encodes)
    else:
        assert not any(name.startswith(("mel-model", "mel-tower")) for name in transforms)
        assert all(px for _, px in encodes)


def test_pixels_from_another_thread_encode_like_the_image(artifacts: tuple[Path, Path]) -> None:
    from service.primitives import MentionInput

    linker = Linker(_settings(artifacts, warmup=False))
    img = Image.new("RGB", (40, 28), (9, 90, 200))
    plain = MentionInput("Jo Bell", "Jo Bell the pilot", img, "sha")
    ready = dataclasses.replace(plain, pixels=linker.model.encoder.pixels(img))
    a, b = linker.encode([plain]).mimic, linker.encode([ready]).mimic
    for name in a.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    wrong = dataclasses.replace(plain, pixels=torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="pixels"):
        linker.encode([wrong])
    linker.close()
