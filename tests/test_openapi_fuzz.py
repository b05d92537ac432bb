"""The server keeps the promises of its own OpenAPI document, under generated input.

Schemathesis reads ``/openapi.json`` from the app and, in-process over ASGI (no socket),
sends each operation its documented examples, boundary ("coverage") cases and fuzzed inputs,
valid and invalid. The checks that must hold for every answer:

- ``not_a_server_error``: no 5xx, whatever the input;
- ``status_code_conformance``: every status answered is one the operation documents;
- ``content_type_conformance`` / ``response_schema_conformance`` /
  ``response_headers_conformance``: the body is of the documented media type and validates
  against the documented schema for that status.

Two servers over the tiny model and index of ``tests/conftest.py``: one without API keys, one
with a key that every generated request carries (a key-less request to it must get the
documented 401 too, which the open server cannot show). Examples are bounded and the run is
deterministic (fixed seed, derandomized Hypothesis, no example database), so a failure
reproduces and the suite stays fast.

Generated input rarely reaches the deeper error paths (a valid image of a refused format, a
decompression bomb, an oversized chunked body, an image host that fails, a server still
loading), so the tests below the fuzz send each of them once by hand, through the same checks.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from service.app import create_app
from service.linker import Linker
from service.settings import ServiceSettings

API_KEY = "fuzz-key"
MAX_EXAMPLES = 50  # per operation and phase; the whole module runs in ~20 s on 2 cores

# The checks named in the module docstring; the others (stateful resource checks, whether
# schema-valid data is always accepted) judge API design, not robustness, and stay off.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": 20261121,
            "generation": {
                "mode": "all",  # valid and invalid inputs
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,  # Hypothesis derandomize: the same cases every run
                "database": "none",  # no .hypothesis/ replay of earlier failures
            },
            "phases": {"stateful": {"enabled": False}},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "request-timeout": 30,
        }
    )


def _settings(artifacts: tuple[Path, Path] | None, **kw: Any) -> ServiceSettings:
    return ServiceSettings(
        model_path=str(artifacts[0]) if artifacts else "unused",
        index_path=str(artifacts[1]) if artifacts else "unused",
        device="cpu",
        use_faiss_gpu=False,
        max_wait_ms=1.0,
        # small limits, so generated input can reach each documented 413 / 422
        max_batch_items=4,
        max_image_bytes=200_000,
        max_image_pixels=1_000_000,
        max_body_bytes=2_000_000,
        **kw,
    )


def _schema(**kw: Any) -> schemathesis.schemas.BaseSchema:
    # The document is built at import (pytest parametrizes over its operations at collection);
    # create_app loads nothing until its lifespan starts, and model/index paths do not enter
    # the document. Each app fixture asserts its running app serves this very document.
    # (Schemathesis' fixture-based loader, schemathesis.pytest.from_fixture, would read it from
    # the running app instead, but fails under pytest 9.2: it sets Function._nodeid, gone there.)
    return schemathesis.openapi.from_dict(
        create_app(_settings(None, **kw)).openapi(), config=_config()
    )


OPEN = _schema()
KEYED = _schema(api_keys=[API_KEY])


@contextmanager
def _running(app: FastAPI, headers: dict[str, str], ready: bool = True) -> Iterator[FastAPI]:
    """The app with its lifespan started and the linker loaded (``/readyz`` = 200).

    Schemathesis keeps one lifespan per app, shared by every in-process call (``app=``), and
    its pytest plugin ends all of them when a test item tears down: so each item (one per
    operation) starts its own app and waits until it is ready, or its first cases would only
    see 503 not_ready.
    """
    with asgi.get_client(app) as client:
        deadline = time.monotonic() + 60
        while ready and client.get("/readyz", headers=headers).status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.02)
    try:
        yield app
    finally:
        asgi.shutdown_lifespans()  # the batcher thread stops, the index closes


@pytest.fixture
def open_app(artifacts: tuple[Path, Path]) -> Iterator[FastAPI]:
    app = create_app(_settings(artifacts))
    assert app.openapi() == OPEN.raw_schema
    with _running(app, {}):
        yield app


@pytest.fixture
def keyed_app(artifacts: tuple[Path, Path]) -> Iterator[FastAPI]:
    app = create_app(_settings(artifacts, api_keys=[API_KEY]))
    assert app.openapi() == KEYED.raw_schema
    with _running(app, {"X-API-Key": API_KEY}):
        yield app


# The app fixture is function-scoped on purpose (see _running) and is a server: it is meant to
# carry over between generated cases, which is what this health check warns about.
SHARED_APP = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@OPEN.parametrize()
@SHARED_APP
def test_open_server_keeps_its_openapi(case: schemathesis.Case, open_app: FastAPI) -> None:
    case.call_and_validate(app=open_app)


@KEYED.parametrize()
@SHARED_APP
def test_keyed_server_keeps_its_openapi(case: schemathesis.Case, keyed_app: FastAPI) -> None:
    case.call_and_validate(app=keyed_app, headers={"X-API-Key": API_KEY})


# --------------------------------------------------------------------------- known error paths
# Random input almost never holds a valid base64 image of a refused format, a decompression
# bomb or an image URL: every error path the server knows is sent once by hand here, and its
# answer must pass the same checks (documented status, error schema, no 5xx).


def _image(fmt: str = "PNG", size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (220, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _wrapped(raw: bytes) -> str:
    """MIME-style base64 (76-column lines), as many encoders write it."""
    text = _b64(raw)
    return "\n".join(text[i : i + 76] for i in range(0, len(text), 76))


LINK = {"mention": "Jo Ames", "sentence": "Jo Ames the painter spoke."}
# (label, /v1/link JSON body): each one takes a different error path
JSON_CASES: list[tuple[str, dict[str, Any]]] = [
    ("unsupported image format (TIFF)", {**LINK, "image": _b64(_image("TIFF"))}),
    ("image_url while URL fetching is off", {**LINK, "image_url": "http://example.com/a.png"}),
    ("image not base64", {**LINK, "image": "%%%not base64"}),
    ("data URI not ;base64", {**LINK, "image": "data:image/png,abc"}),
    ("base64 wrapped at 76 columns", {**LINK, "image": _wrapped(_image(size=(64, 64)))}),
    ("bytes that are no image", {**LINK, "image": _b64(b"definitely not an image")}),
    ("image over max_image_bytes", {**LINK, "image": _b64(b"\x00" * 300_000)}),
    ("decompression bomb", {**LINK, "image": _b64(_image(size=(2000, 2000)))}),
    ("image and image_url", {**LINK, "image": _b64(_image()), "image_url": "http://x/a.png"}),
    ("blank mention", {**LINK, "mention": "   "}),
    ("span outside the sentence", {**LINK, "span": [0, 999]}),
    ("reranker not loaded", {**LINK, "reranker": "drin"}),
    ("top_k over top_k_max", {**LINK, "top_k": 101}),
]


def _raw_cases() -> list[tuple[str, str, dict[str, Any], int | None]]:
    """(label, path, requests kwargs, status required): bodies Case cannot express."""
    json_ct = {"content-type": "application/json"}
    big = b"{" + b" " * 2_100_000 + b"}"  # over max_body_bytes

    def chunked() -> Iterator[bytes]:
        yield b"{"
        for _ in range(3):
            yield b" " * 1_000_000

    return [
        ("malformed JSON", "/v1/link", {"data": b'{"mention":', "headers": json_ct}, None),
        (
            "invalid UTF-8 in JSON",
            "/v1/link",
            {"data": b'{"mention": "\xff\xfe", "sentence": "s"}', "headers": json_ct},
            None,
        ),
        (
            "JSON body as text/plain",
            "/v1/link",
            {"data": b"{}", "headers": {"content-type": "text/plain"}},
            None,
        ),
        ("body over the limit, Content-Length", "/v1/link", {"data": big, "headers": json_ct}, 413),
        # BodyLimit's docstring: "413 for bodies over the limit (declared or streamed)"
        ("body over the limit, chunked", "/v1/link", {"data": chunked(), "headers": json_ct}, 413),
        # Schemathesis sends OpenAPI 3.1 binary parts (contentMediaType) as plain fields, no
        # filename, so fuzzing never uploads a file: the form's image paths are sent here.
        (
            "TIFF upload",
            "/v1/link/form",
            {"data": dict(LINK), "files": {"image": ("a.tif", _image("TIFF"), "image/tiff")}},
            None,
        ),
        (
            "upload that is no image",
            "/v1/link/form",
            {"data": dict(LINK), "files": {"image": ("a.png", b"not an image", "image/png")}},
            None,
        ),
        (
            "multipart that does not parse",
            "/v1/link/form",
            {"data": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=xx"}},
            None,
        ),
    ]


def _failure(
    label: str,
    case: schemathesis.Case,
    app: FastAPI,
    response: Any = None,
    allowed_5xx: tuple[int, ...] = (),
) -> str | None:
    """None when the answer passes every check, else one line for the failure list.

    ``allowed_5xx``: server errors that are this answer's documented meaning (503 while
    loading, 502 / 504 for a failing image host); any other 5xx still fails.
    """
    head = f"{case.operation.label} {label}"
    if response is None:
        try:
            response = case.call(app=app)
        except Exception as exc:  # in-process ASGI re-raises what a socket server sends as 500
            return f"{head}: unhandled {type(exc).__name__} ({exc}), a 500 over HTTP"
    excluded = [not_a_server_error] if allowed_5xx else []
    try:
        case.validate_response(response, excluded_checks=excluded)
    except BaseExceptionGroup as group:
        titles = "; ".join(sorted({getattr(f, "title", str(f)) for f in group.exceptions}))
        return f"{head}: {response.status_code} {titles}: {response.text[:200]}"
    if response.status_code >= 500 and response.status_code not in allowed_5xx:
        return f"{head}: {response.status_code} server error: {response.text[:200]}"
    return None


def _failures(
    app: FastAPI, cases: list[tuple[str, schemathesis.Case]], allowed_5xx: tuple[int, ...] = ()
) -> list[str]:
    found = (_failure(label, case, app, allowed_5xx=allowed_5xx) for label, case in cases)
    return [f for f in found if f]


def test_known_error_paths_are_documented(open_app: FastAPI) -> None:
    link = OPEN["/v1/link"]["POST"]
    form = OPEN["/v1/link/form"]["POST"]
    batch = OPEN["/v1/link/batch"]["POST"]
    entity = OPEN["/v1/entities/{entity_id}"]["GET"]
    cases = [
        (label, link.Case(body=body, media_type="application/json")) for label, body in JSON_CASES
    ]
    form_body = {"mention": "Jo Ames", "sentence": "Jo Ames the painter"}
    cases += [
        (
            "span_start alone",
            form.Case(body={**form_body, "span_start": 0}, media_type="multipart/form-data"),
        ),
        (
            "more items than max_batch_items",
            batch.Case(body={"items": [LINK] * 5}, media_type="application/json"),
        ),
        ("unknown entity", entity.Case(path_parameters={"entity_id": "no-such-entity"})),
    ]
    bodies = [body for _, body in JSON_CASES]
    for i in range(0, len(bodies), 4):  # max_batch_items: every bad item fails alone in a 200
        items = {"items": bodies[i : i + 4]}
        cases.append(
            (f"bad items {i}-{i + 3}", batch.Case(body=items, media_type="application/json"))
        )
    failures = _failures(open_app, cases)
    with asgi.get_client(open_app) as client:
        for label, path, kwargs, required in _raw_cases():
            response = client.post(path, **kwargs)
            case = OPEN[path]["POST"].Case()
            failure = _failure(label, case, open_app, response)
            if failure is None and required is not None and response.status_code != required:
                failure = (
                    f"{case.operation.label} {label}: {response.status_code}, {required} "
                    f"required: {response.text[:200]}"
                )
            if failure:
                failures.append(failure)
    assert not failures, "\n".join(failures)


def test_keyed_server_without_key_answers_documented_401(keyed_app: FastAPI) -> None:
    """Every /v1 operation without a key: 401, documented, in the error schema (the admin
    routes: 403 admin_disabled, as this server configures no admin key)."""
    bodies: dict[str, Any] = {
        "/v1/link": LINK,
        "/v1/link/form": LINK,
        "/v1/link/batch": {"items": [LINK]},
        "/v1/admin/entities": {"entities": [{"id": "X", "name": "X"}]},
        "/v1/admin/entities/form": {"entity": '{"id": "X", "name": "X"}'},
        "/v1/admin/swap": {},
        "/v1/admin/entities/{entity_id}": {"name": "X"},
    }
    seen = 0
    for result in KEYED.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith("/v1/"):
            continue
        kw: dict[str, Any] = {}
        if operation.method in ("post", "put"):
            kw["body"] = bodies[operation.path]
        if "{entity_id}" in operation.path:
            kw["path_parameters"] = {"entity_id": "E00"}
        response = operation.Case(**kw).call_and_validate(app=keyed_app)
        admin = operation.path.startswith("/v1/admin/")
        assert response.status_code == (403 if admin else 401), (operation.label, response.text)
        if admin:
            assert response.json()["error"]["code"] == "admin_disabled"
        seen += 1
    assert seen == 10


def test_answers_while_loading_are_documented(artifacts: tuple[Path, Path]) -> None:
    """Before the linker is loaded: /readyz and every /v1 operation answer a documented 503."""
    release = threading.Event()

    def never_ready(settings: ServiceSettings) -> Linker:
        release.wait(30)
        raise RuntimeError("the test is over")

    app = create_app(_settings(artifacts), never_ready)
    entity = {"entity_id": "E00"}
    cases = [
        ("while loading", OPEN["/readyz"]["GET"].Case()),
        ("while loading", OPEN["/v1/link"]["POST"].Case(body=LINK, media_type="application/json")),
        ("while loading", OPEN["/v1/entities/{entity_id}"]["GET"].Case(path_parameters=entity)),
    ]
    try:
        with _running(app, {}, ready=False):
            statuses = [case.call(app=app).status_code for _, case in cases]
            failures = _failures(app, cases, allowed_5xx=(503,))
    finally:
        release.set()
    assert statuses == [503, 503, 503]
    assert not failures, "\n".join(failures)


class _Upstream(BaseHTTPRequestHandler):
    """An image host that answers 404 to everything."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_image_url_failures_are_documented(artifacts: tuple[Path, Path]) -> None:
    """With URL fetching on: forbidden targets, and hosts that refuse, fail or stay silent.

    A failing or silent image host may be answered 502 / 504 (a gateway's codes, when
    documented); any other 5xx, an unhandled exception above all, is a server bug.
    """
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    silent = socket.socket()  # connections complete in the kernel backlog; nothing answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    link = OPEN["/v1/link"]["POST"]

    def case(url: str) -> schemathesis.Case:
        return link.Case(body={**LINK, "image_url": url}, media_type="application/json")

    public = [  # the default: private and loopback targets are refused before any connection
        ("private target", case("http://10.0.0.1/a.png")),
        ("scheme not http(s)", case("file:///etc/passwd")),
    ]
    private = [  # an intranet deployment (url_allow_private) reaching loopback hosts
        ("connection refused", case(f"http://127.0.0.1:{closed}/a.png")),
        ("image host answers 404", case(f"http://127.0.0.1:{upstream.server_address[1]}/a.png")),
        ("image host silent", case(f"http://127.0.0.1:{silent.getsockname()[1]}/a.png")),
    ]
    failures = []
    try:
        for allow_private, cases in ((False, public), (True, private)):
            conf = _settings(
                artifacts, allow_image_urls=True, url_allow_private=allow_private, url_timeout_s=0.5
            )
            app = create_app(conf)
            with _running(app, {}):
                failures += _failures(app, cases, allowed_5xx=(502, 504))
    finally:
        upstream.shutdown()
        silent.close()
    assert not failures, "\n".join(failures)
