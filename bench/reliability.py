"""Reliability bench of the linking server: bad input, a Redis outage, SIGTERM, huge images.

    python bench/reliability.py --work artifacts/bench/reliability        # ~4 min on 2 cores
    python bench/reliability.py --max-request-pixels 100000000            # with a pixel budget
    python bench/reliability.py --render        # rewrite results/reliability.md from the JSON

Everything runs on 127.0.0.1 and stops by itself. Under ``--work`` it builds, when absent, a
small demo world (``mel-data demo --entities 200``), a model with the embedded pretrained
backbone and fresh (untrained) MIMIC layers (``LinkingModel.default``, what ``mel-train``
starts from; linking quality is beside the point here) and its Flat index (``mel-index
build``). It starts its own ``redis-server`` and ``mel-serve`` on free ports, and measures,
each phase bounded by a request count and ``--phase-timeout`` seconds:

a. mixed load: valid links (with and without an image, multipart, batch) interleaved with
   malformed JSON, invalid UTF-8, bad base64, wrong types, oversized bodies (declared by
   Content-Length and streamed chunked), unknown routes and methods, undecodable and refused
   images, and base64 wrapped at 76 columns, 16 in flight. Status codes per kind, 5xx and
   connection errors (both must be 0), p50/p99 latency of the valid requests.
b. Redis SIGKILLed and restarted under load: failed requests (must be 0), how long until
   ``mel_redis_up`` (scraped from ``/metrics``) reads 0 after the kill and 1 after the
   restart, and when cache hits resume.
c. SIGTERM with requests in flight: each must complete with 200; drain time and exit code.
d. a fresh server (its default settings, plus ``MEL_MAX_REQUEST_PIXELS`` when
   ``--max-request-pixels`` is given) answers one ``/v1/link/batch`` of 16 distinct
   5000 x 5000 PNGs (tiny files, 25 MP each decoded): its status and item codes, and the
   server's peak (VmHWM) and settled (VmRSS) memory from ``/proc/PID/status``.

Results: ``--results`` (JSON) and the markdown beside it. A violated invariant is recorded
(``ok: false`` in its phase); ``--strict`` also makes the exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import httpx
from load_bench import free_port, stats_ms, wait_ready

logger = logging.getLogger("reliability")

REPO = Path(__file__).resolve().parents[1]
JSON_CT = {"content-type": "application/json"}
# Phase a's server: a 2 MB body limit (the default is 32 MiB) so oversized bodies cost the
# shared CPU little; phase d's server keeps every default.
PHASE_A_BODY_LIMIT = 2_000_000


# --------------------------------------------------------------------------- artifacts
def ensure_artifacts(work: Path, entities: int, seed: int) -> tuple[Path, Path, Path]:
    """(world, model, index) under ``work``, each built only when missing."""
    bindir = Path(sys.executable).parent
    world, model, index = work / "world", work / "model", work / "index"
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    if not (world / "meta.json").is_file():
        cmd = [str(bindir / "mel-data"), "demo", "--out", str(world)]
        cmd += ["--entities", str(entities), "--seed", str(seed)]
        logger.info("building the world: %s", " ".join(cmd))
        subprocess.run(cmd, check=True, env=env)
    if not (model / "config.json").is_file():
        # what mel-train starts from (LinkingModel.default): the embedded pretrained backbone,
        # fresh MIMIC layers; in a child process, so torch stays out of the load driver
        logger.info("saving a fresh model (pretrained backbone, untrained MIMIC) to %s", model)
        code = (
            "import sys; from models.model import LinkingModel; "
            "LinkingModel.default(seed=int(sys.argv[2])).save_pretrained("
            "sys.argv[1], meta={'note': 'untrained MIMIC layers (bench/reliability.py)'})"
        )
        subprocess.run([sys.executable, "-c", code, str(model), str(seed)], check=True, env=env)
    if not (index / "manifest.json").is_file():
        cmd = [str(bindir / "mel-index"), "build", "--kb", str(world / "kb.jsonl")]
        cmd += ["--model", str(model), "--out", str(index), "--factory", "Flat", "--no-progress"]
        logger.info("building the index: %s", " ".join(cmd))
        subprocess.run(cmd, check=True, env=env)
    return world, model, index


def _pythonpath() -> str:
    # the checkout's code, whatever the venv's editable install points at
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


@dataclass
class Mentions:
    """The world's mentions as JSON-ready dicts (image inlined as base64), each handed out once."""

    with_image: list[dict[str, Any]]
    without_image: list[dict[str, Any]]

    @classmethod
    def load(cls, world: Path) -> Mentions:
        with_image: list[dict[str, Any]] = []
        without_image: list[dict[str, Any]] = []
        with open(world / "mentions.jsonl", encoding="utf-8") as f:
            for line in f:
                m = json.loads(line)
                body = {"mention": m["mention"], "sentence": m["sentence"]}
                if m.get("image"):
                    data = (world / m["image"]).read_bytes()
                    with_image.append({**body, "image": base64.b64encode(data).decode()})
                else:
                    without_image.append(body)
        return cls(with_image, without_image)

    def take(self, n: int, image: bool) -> list[dict[str, Any]]:
        pool = self.with_image if image else self.without_image
        if n > len(pool):
            raise SystemExit(f"out of distinct mentions ({'with' if image else 'without'} image)")
        out, pool[:] = pool[:n], pool[n:]
        return out


# --------------------------------------------------------------------------- processes
class Redis:
    """A throw-away redis-server on a fixed loopback port (no persistence), killable."""

    def __init__(self, exe: str, port: int) -> None:
        self.exe, self.port = exe, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.perf_counter()
        cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return time.perf_counter() - t0
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None


class Server:
    """``mel-serve`` in its own process on a free loopback port."""

    def __init__(self, model: Path, index: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("MEL_")}
        self.env = {**base_env, "PYTHONPATH": _pythonpath(), "MEL_DEVICE": "cpu", **env}
        cmd = [str(Path(sys.executable).parent / "mel-serve"), "--model", str(model)]
        cmd += ["--index", str(index), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--log-level", "warning"]
        logger.info("starting %s (%s)", " ".join(cmd), {k: v for k, v in env.items()})
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT)

    def memory(self) -> dict[str, int]:
        """VmRSS / VmHWM (peak RSS since start) in bytes, from /proc/PID/status."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def stop(self, timeout: float = 60) -> tuple[int | None, float]:
        """SIGTERM and wait: (exit code, seconds to exit); killed after ``timeout``."""
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None, time.perf_counter() - t0
        return rc, time.perf_counter() - t0


def scrape(text: str) -> dict[str, float]:
    """The few samples the phases read, from a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mel_redis_up":
                out["redis_up"] = s.value
            elif s.name == "mel_cache_requests_total" and s.labels.get("kind") == "result":
                out[f"result_{s.labels['outcome']}"] = s.value
            elif s.name == "mel_cache_errors_total":
                out["cache_errors"] = out.get("cache_errors", 0.0) + s.value
    return out


# --------------------------------------------------------------------------- phase a
@dataclass(frozen=True)
class Req:
    kind: str
    method: str
    path: str
    body: bytes | Callable[[], AsyncIterator[bytes]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, Any] | None = None
    data: dict[str, str] | None = None


# what each kind should get: the server's documented answers (wrapped base64 is still
# base64 by RFC 2045, so 200); only 5xx and connection errors fail the phase
EXPECTED = {
    "valid_image": 200,
    "valid_text": 200,
    "valid_form_upload": 200,
    "valid_batch_mixed_items": 200,
    "base64_wrapped_76": 200,
    "malformed_json": 422,
    "invalid_utf8": 422,  # an unparseable body is an invalid request (invalid_body)
    "bad_base64": 400,
    "wrong_types": 422,
    "oversized_content_length": 413,
    "oversized_chunked": 413,
    "unknown_route": 404,
    "wrong_method": 405,
    "bad_image": 422,
    "unsupported_format": 415,
}


def _png(size: tuple[int, int], colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, colour)
    ImageDraw.Draw(img).rectangle((size[0] // 8, size[1] // 8, size[0] // 4, size[1] // 4))
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format=fmt, compress_level=9)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def mixed_requests(mentions: Mentions, counts: dict[str, int], seed: int) -> list[Req]:
    """The phase-a requests, shuffled (deterministic); valid mentions each used once."""
    rng = random.Random(seed)
    enc = json.dumps
    reqs: list[Req] = []

    def add(kind: str, make: Callable[[int], Req]) -> None:
        reqs.extend(make(i) for i in range(counts.get(kind, 0)))

    img = mentions.take(counts.get("valid_image", 0), image=True)
    add("valid_image", lambda i: Req("valid_image", "POST", "/v1/link", enc(img[i]).encode()))
    txt = mentions.take(counts.get("valid_text", 0), image=False)
    add("valid_text", lambda i: Req("valid_text", "POST", "/v1/link", enc(txt[i]).encode()))
    form = mentions.take(counts.get("valid_form_upload", 0), image=True)

    def form_req(i: int) -> Req:
        m = form[i]
        raw = base64.b64decode(m["image"])
        fields = {"mention": m["mention"], "sentence": m["sentence"]}
        files = {"image": ("m.jpg", raw, "image/jpeg")}
        return Req("valid_form_upload", "POST", "/v1/link/form", data=fields, files=files)

    add("valid_form_upload", form_req)
    batch = mentions.take(2 * counts.get("valid_batch_mixed_items", 0), image=True)

    def batch_req(i: int) -> Req:
        items = [batch[2 * i], {"mention": 3}, batch[2 * i + 1], {**batch[2 * i], "image": "%%"}]
        return Req(
            "valid_batch_mixed_items", "POST", "/v1/link/batch", enc({"items": items}).encode()
        )

    add("valid_batch_mixed_items", batch_req)
    wrap = mentions.take(counts.get("base64_wrapped_76", 0), image=True)

    def wrapped(i: int) -> Req:
        b = wrap[i]["image"]
        body = {**wrap[i], "image": "\n".join(b[j : j + 76] for j in range(0, len(b), 76))}
        return Req("base64_wrapped_76", "POST", "/v1/link", enc(body).encode())

    add("base64_wrapped_76", wrapped)
    base = {"mention": "Nina Coroux", "sentence": "Nina Coroux, the chef, spoke."}
    add("malformed_json", lambda i: Req("malformed_json", "POST", "/v1/link", b'{"mention": "x",'))
    add(
        "invalid_utf8",
        lambda i: Req(
            "invalid_utf8", "POST", "/v1/link", b'{"mention": "\xff\xfe", "sentence": "s"}'
        ),
    )
    add(
        "bad_base64",
        lambda i: Req("bad_base64", "POST", "/v1/link", enc({**base, "image": "%%%!"}).encode()),
    )
    add(
        "wrong_types",
        lambda i: Req(
            "wrong_types",
            "POST",
            "/v1/link",
            enc({"mention": 7, "sentence": [1], "top_k": "x"}).encode(),
        ),
    )
    big = b'{"mention": "x", "sentence": "' + b"y" * (PHASE_A_BODY_LIMIT + 100_000) + b'"}'
    add(
        "oversized_content_length",
        lambda i: Req("oversized_content_length", "POST", "/v1/link", big),
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"mention": "x", "sentence": "'
        for _ in range(3):
            yield b"y" * (PHASE_A_BODY_LIMIT // 2)
        yield b'"}'

    add("oversized_chunked", lambda i: Req("oversized_chunked", "POST", "/v1/link", chunks))
    add(
        "unknown_route",
        lambda i: Req("unknown_route", "POST" if i % 2 else "GET", f"/v1/nope/{i}", b"{}"),
    )
    add("wrong_method", lambda i: Req("wrong_method", "GET" if i % 2 else "PUT", "/v1/link"))
    junk = base64.b64encode(b"\x89PNG\r\n\x1a\n not really a png" * 20).decode()
    add(
        "bad_image",
        lambda i: Req("bad_image", "POST", "/v1/link", enc({**base, "image": junk}).encode()),
    )
    tiff = base64.b64encode(_png((64, 64), (200, 30, 30), "TIFF")).decode()
    add(
        "unsupported_format",
        lambda i: Req(
            "unsupported_format", "POST", "/v1/link", enc({**base, "image": tiff}).encode()
        ),
    )
    rng.shuffle(reqs)
    return reqs


async def send(client: httpx.AsyncClient, r: Req) -> tuple[int | str, float, dict[str, Any] | None]:
    """(status or error type name, seconds, JSON body of a 200)."""
    t = time.perf_counter()
    content = r.body() if callable(r.body) else r.body
    headers = r.headers or ({} if r.files else JSON_CT)
    try:
        resp = await client.request(
            r.method, r.path, content=content, headers=headers, files=r.files, data=r.data
        )
    except httpx.TransportError as exc:
        return type(exc).__name__, time.perf_counter() - t, None
    secs = time.perf_counter() - t
    body = resp.json() if resp.status_code == 200 else None
    return resp.status_code, secs, body


async def phase_mixed(
    base: str, reqs: list[Req], concurrency: int, timeout: float
) -> dict[str, Any]:
    queue = list(reversed(reqs))
    by_kind: dict[str, Counter[str]] = {}
    valid_lat: list[float] = []
    cached = 0
    deadline = time.perf_counter() + timeout
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal cached
        while queue and time.perf_counter() < deadline:
            r = queue.pop()
            status, secs, body = await send(client, r)
            by_kind.setdefault(r.kind, Counter())[str(status)] += 1
            if r.kind.startswith("valid_") and status == 200:
                valid_lat.append(secs)
                if body and body.get("timings", {}).get("cached"):
                    cached += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        health = (await client.get("/healthz")).status_code
    wall = time.perf_counter() - t0
    sent = sum(sum(c.values()) for c in by_kind.values())
    server_errors = sum(n for c in by_kind.values() for s, n in c.items() if s.startswith("5"))
    conn_errors = sum(n for c in by_kind.values() for s, n in c.items() if not s.isdigit())
    unexpected = {
        kind: {s: n for s, n in c.items() if s != str(EXPECTED.get(kind))}
        for kind, c in sorted(by_kind.items())
    }
    return {
        "requests": sent,
        "planned": len(reqs),
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "status_by_kind": {k: dict(sorted(c.items())) for k, c in sorted(by_kind.items())},
        "expected_by_kind": EXPECTED,
        "unexpected_by_kind": {k: v for k, v in unexpected.items() if v},
        "server_errors_5xx": server_errors,
        "connection_errors": conn_errors,
        "valid_latency": stats_ms(valid_lat),
        "valid_cached": cached,
        "healthz_after": health,
        "ok": server_errors == 0 and conn_errors == 0 and sent == len(reqs) and health == 200,
    }


# --------------------------------------------------------------------------- phase b
async def phase_redis(
    base: str, redis: Redis, pool: list[dict[str, Any]], a: argparse.Namespace
) -> dict[str, Any]:
    """Load on a small repeated pool (cache hits while Redis is up); kill Redis, restart it."""
    bodies = [json.dumps(b).encode() for b in pool]
    events: list[tuple[float, str, int | str, bool, float]] = []  # (t, stage, status, cached, s)
    scrapes: list[tuple[float, dict[str, float]]] = []
    stage = "before"
    stop = asyncio.Event()
    t_start = time.perf_counter()
    deadline = t_start + a.phase_timeout

    async def load(client: httpx.AsyncClient, k: int) -> None:
        i = k
        while not stop.is_set() and time.perf_counter() < deadline:
            r = Req("redis", "POST", "/v1/link", bodies[i % len(bodies)])
            i += 1
            status, secs, body = await send(client, r)
            hit = bool(body and body.get("timings", {}).get("cached"))
            events.append((time.perf_counter(), stage, status, hit, secs))

    async def monitor(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                text = (await client.get("/metrics")).text
                scrapes.append((time.perf_counter(), scrape(text)))
            except httpx.TransportError:
                pass
            await asyncio.sleep(a.scrape_interval)

    def first(after: float, pred: Callable[[dict[str, float]], bool]) -> float | None:
        return next((t - after for t, s in scrapes if t > after and pred(s)), None)

    async def wait_for(
        after: float, pred: Callable[[dict[str, float]], bool], secs: float
    ) -> float | None:
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            found = first(after, pred)
            if found is not None:
                return found
            await asyncio.sleep(a.scrape_interval / 2)
        return None

    limits = httpx.Limits(max_connections=a.redis_concurrency + 2)
    out: dict[str, Any] = {"pool": len(pool), "concurrency": a.redis_concurrency}
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(load(client, k)) for k in range(a.redis_concurrency)]
        tasks.append(asyncio.create_task(monitor(client)))
        await asyncio.sleep(a.redis_warm_s)
        stage = "outage"
        t_kill = time.perf_counter()
        redis.kill()
        logger.info("redis SIGKILLed")

        async def probe_readyz(up: float) -> tuple[dict[str, Any], float | None]:
            """One /readyz probe, then how long until the scraped gauge reads ``up``."""
            probe = await client.get("/readyz")
            doc = {"status": probe.status_code, "redis": probe.json().get("redis")}
            t = time.perf_counter()
            return doc, await wait_for(t, lambda s: s.get("redis_up") == up, 2.0)

        # mel_redis_up from /metrics scrapes alone (no /readyz probe), bounded
        out["redis_up_0_after_kill_s"] = await wait_for(
            t_kill, lambda s: s.get("redis_up") == 0.0, a.flip_timeout
        )
        await asyncio.sleep(max(0.0, a.redis_down_s - (time.perf_counter() - t_kill)))
        (
            out["readyz_during_outage"],
            out["redis_up_0_after_readyz_probe_s"],
        ) = await probe_readyz(0.0)
        stage = "after"
        t_restart = time.perf_counter()
        out["redis_restart_s"] = round(redis.start(), 3)
        logger.info("redis restarted")
        out["redis_up_1_after_restart_s"] = await wait_for(
            t_restart, lambda s: s.get("redis_up") == 1.0, a.flip_timeout
        )
        (
            out["readyz_after_restart"],
            out["redis_up_1_after_readyz_probe_s"],
        ) = await probe_readyz(1.0)
        end = time.perf_counter() + a.flip_timeout
        while time.perf_counter() < end and not any(e[3] and e[0] > t_restart for e in events):
            await asyncio.sleep(0.05)
        await asyncio.sleep(a.redis_after_s)
        stop.set()
        await asyncio.gather(*tasks)
    hits_after = [e[0] - t_restart for e in events if e[0] > t_restart and e[3]]
    per_stage = {}
    for name in ("before", "outage", "after"):
        evs = [e for e in events if e[1] == name]
        statuses = Counter(str(e[2]) for e in evs)
        per_stage[name] = {
            "requests": len(evs),
            "status": dict(sorted(statuses.items())),
            "cache_hit_share": round(sum(e[3] for e in evs) / len(evs), 3) if evs else None,
            "latency": stats_ms([e[4] for e in evs if e[2] == 200]),
        }
    failed = sum(1 for e in events if e[2] != 200)
    last = scrapes[-1][1] if scrapes else {}

    def r3(x: float | None) -> float | None:
        return round(x, 3) if x is not None else None

    for key in [k for k in out if k.endswith("_s") and k != "redis_restart_s"]:
        out[key] = r3(out[key])
    out.update(
        requests=len(events),
        failed_requests=failed,
        by_stage=per_stage,
        first_cache_hit_after_restart_s=r3(hits_after[0]) if hits_after else None,
        cache_errors_total=last.get("cache_errors"),
        scrape_interval_s=a.scrape_interval,
        flip_timeout_s=a.flip_timeout,
        ok=failed == 0
        and out["redis_up_0_after_kill_s"] is not None
        and out["redis_up_1_after_restart_s"] is not None
        and bool(hits_after),
    )
    return out


# --------------------------------------------------------------------------- phase c
async def phase_sigterm(
    server: Server, bodies: list[dict[str, Any]], a: argparse.Namespace
) -> dict[str, Any]:
    """Fresh image requests all at once; SIGTERM while they are in flight; all must get 200."""
    limits = httpx.Limits(max_connections=len(bodies) + 8)
    async with httpx.AsyncClient(base_url=server.base, timeout=90, limits=limits) as client:
        tasks = [
            asyncio.create_task(
                send(client, Req("drain", "POST", "/v1/link", json.dumps(b).encode()))
            )
            for b in bodies
        ]
        await asyncio.sleep(a.sigterm_after_ms / 1000)
        in_flight = sum(not t.done() for t in tasks)
        t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        logger.info("SIGTERM with %d of %d requests in flight", in_flight, len(tasks))
        await asyncio.sleep(0.2)
        late = await send(client, Req("late", "GET", "/healthz"))  # a new request after SIGTERM
        results = await asyncio.gather(*tasks)
        answered_s = time.perf_counter() - t0
    try:
        rc: int | None = await asyncio.to_thread(server.proc.wait, a.phase_timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)
        rc = None
    drain = time.perf_counter() - t0
    statuses = Counter(str(r[0]) for r in results)
    return {
        "requests": len(tasks),
        "in_flight_at_sigterm": in_flight,
        "sigterm_after_ms": a.sigterm_after_ms,
        "status": dict(sorted(statuses.items())),
        "all_200": statuses == Counter({"200": len(tasks)}),
        "last_answer_after_sigterm_s": round(answered_s, 3),
        "drain_s": round(drain, 3),
        "exit_code": rc,
        "request_after_sigterm": str(late[0]),
        "ok": statuses == Counter({"200": len(tasks)}) and rc == 0,
    }


# --------------------------------------------------------------------------- phase d
def big_pngs(folder: Path, n: int, side: int) -> list[bytes]:
    """``n`` distinct ``side`` x ``side`` PNGs (one colour and a square: ~100 KB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"{side}-{i}.png"
        if not path.is_file():
            path.write_bytes(_png((side, side), (10 + 15 * i, 200 - 10 * i, 30 + 7 * i)))
        out.append(path.read_bytes())
    return out


def phase_pixels(server: Server, pngs: list[bytes], a: argparse.Namespace) -> dict[str, Any]:
    time.sleep(1.0)  # let start-up allocations settle
    before = server.memory()
    items = [
        {
            "mention": f"Item {i}",
            "sentence": f"Item {i} was pictured.",
            "image": base64.b64encode(p).decode(),
        }
        for i, p in enumerate(pngs)
    ]
    body = json.dumps({"items": items}).encode()
    peak_sampled = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_sampled
        while not done.is_set():
            peak_sampled = max(peak_sampled, server.memory().get("VmRSS", 0))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        r = httpx.post(
            server.base + "/v1/link/batch", content=body, headers=JSON_CT, timeout=a.phase_timeout
        )
        status: int | str = r.status_code
        answer = (
            r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        )
    except httpx.TransportError as exc:
        status, answer = type(exc).__name__, None
    secs = time.perf_counter() - t0
    done.set()
    sampler.join()
    after = server.memory()
    time.sleep(a.settle_s)
    settled = server.memory()
    codes: Counter[str] = Counter()
    if isinstance(answer, dict) and "results" in answer:
        for res in answer["results"]:
            codes["ok" if res.get("result") else res.get("error", {}).get("code", "?")] += 1
    elif isinstance(answer, dict) and "error" in answer:
        codes[answer["error"]["code"]] += 1
    alive = (
        httpx.get(server.base + "/healthz", timeout=10).status_code
        if server.proc.poll() is None
        else None
    )
    mib = 1 / 2**20
    return {
        "images": len(pngs),
        "side": a.pixel_side,
        "decoded_pixels_total": len(pngs) * a.pixel_side**2,
        "body_bytes": len(body),
        "max_request_pixels": a.max_request_pixels,
        "status": status,
        "codes": dict(codes),
        "seconds": round(secs, 2),
        "rss_before_mib": round(before["VmRSS"] * mib, 1),
        "rss_peak_mib": round(after["VmHWM"] * mib, 1),
        "rss_peak_sampled_mib": round(peak_sampled * mib, 1),
        "rss_right_after_mib": round(after["VmRSS"] * mib, 1),
        "rss_settled_mib": round(settled["VmRSS"] * mib, 1),
        "settle_s": a.settle_s,
        "healthz_after": alive,
        # whatever the answer (200 today, 413 pixel_budget_exceeded with a budget), the server
        # must answer and stay up
        "ok": isinstance(status, int) and status < 500 and alive == 200,
    }


# --------------------------------------------------------------------------- markdown
def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"Server: `mel-serve` on 127.0.0.1 over a {res['entities']}-entity demo world (Flat "
        f"index; model: pretrained backbone, untrained MIMIC layers), CPU, 1 uvicorn worker; "
        f"client: httpx (async) in the bench process on the same machine.",
        "",
    ]
    if "mixed" in res:
        p = res["mixed"]
        lat = p["valid_latency"]
        lines += [
            f"**a. Mixed valid / invalid load** ({p['requests']} of {p['planned']} requests, "
            f"{p['concurrency']} in flight, {p['wall_s']} s; server: Redis cache, "
            f"MEL_MAX_BODY_BYTES={res['settings']['phase_a_max_body_bytes']}): "
            f"**{p['server_errors_5xx']} 5xx, {p['connection_errors']} connection errors** "
            f"(goal 0, 0); valid requests p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms "
            f"(n = {lat['n']}, {p['valid_cached']} cache hits); /healthz after: "
            f"{p['healthz_after']}. {'OK' if p['ok'] else 'NOT OK'}.",
            "",
            "| kind | expected | answers |",
            "| --- | --- | --- |",
        ]
        for kind, c in p["status_by_kind"].items():
            got = ", ".join(f"{s}: {n}" for s, n in c.items())
            flag = "" if kind not in p["unexpected_by_kind"] else " **(unexpected)**"
            lines.append(f"| {kind} | {p['expected_by_kind'].get(kind)} | {got}{flag} |")
        lines.append("")
    if "redis" in res:
        p = res["redis"]

        def s(x: float | None) -> str:
            return f"{x:.2f} s" if x is not None else f"not within {p['flip_timeout_s']} s"

        lines += [
            f"**b. Redis SIGKILLed and restarted under load** ({p['requests']} requests, "
            f"{p['concurrency']} in flight, a pool of {p['pool']} repeated text mentions; "
            f"/metrics scraped every {p['scrape_interval_s']} s): **{p['failed_requests']} failed "
            f"requests** (goal 0). {'OK' if p['ok'] else 'NOT OK'}.",
            "",
            "| measurement | value |",
            "| --- | --- |",
            f"| `mel_redis_up` reads 0 after the kill (scrapes only) | {s(p['redis_up_0_after_kill_s'])} |",
            f"| ... after one `/readyz` probe | {s(p['redis_up_0_after_readyz_probe_s'])} "
            f"(readyz: {p['readyz_during_outage']}) |",
            f"| `mel_redis_up` reads 1 after the restart (scrapes only) | {s(p['redis_up_1_after_restart_s'])} |",
            f"| ... after one `/readyz` probe | {s(p['redis_up_1_after_readyz_probe_s'])} "
            f"(readyz: {p['readyz_after_restart']}) |",
            f"| first cache hit after the restart | {s(p['first_cache_hit_after_restart_s'])} |",
            f"| cache errors counted (`mel_cache_errors_total`) | {p['cache_errors_total']} |",
            "",
            "| stage | requests | statuses | cache hit share | p50 / p99 ms |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, st in p["by_stage"].items():
            lat = st["latency"]
            lines.append(
                f"| {name} | {st['requests']} | {st['status']} | {st['cache_hit_share']} | "
                f"{lat.get('p50_ms')} / {lat.get('p99_ms')} |"
            )
        lines.append("")
    if "sigterm" in res:
        p = res["sigterm"]
        lines += [
            f"**c. SIGTERM with requests in flight**: {p['requests']} fresh image requests at "
            f"once, SIGTERM {p['sigterm_after_ms']} ms later with {p['in_flight_at_sigterm']} "
            f"in flight: answers {p['status']} (goal: all 200); last answer "
            f"{p['last_answer_after_sigterm_s']} s after SIGTERM, process exit after "
            f"**{p['drain_s']} s with exit code {p['exit_code']}** (goal 0); a new request "
            f"0.2 s after SIGTERM: {p['request_after_sigterm']}. "
            f"{'OK' if p['ok'] else 'NOT OK'}.",
            "",
        ]
    if "pixels" in res:
        p = res["pixels"]
        budget = p["max_request_pixels"] or "unset (server default)"
        lines += [
            f"**d. Pixel budget**: one `/v1/link/batch` of {p['images']} distinct "
            f"{p['side']} x {p['side']} PNGs ({p['decoded_pixels_total'] / 1e6:.0f} M decoded "
            f"pixels in a {p['body_bytes'] / 1e6:.1f} MB body), fresh server, default settings, "
            f"MEL_MAX_REQUEST_PIXELS {budget}: answer **{p['status']}** {p['codes']} in "
            f"{p['seconds']} s; server RSS {p['rss_before_mib']} MiB before, **peak "
            f"{p['rss_peak_mib']} MiB** (VmHWM), {p['rss_right_after_mib']} MiB right after, "
            f"**{p['rss_settled_mib']} MiB settled** ({p['settle_s']} s later); /healthz after: "
            f"{p['healthz_after']}; exit code at SIGTERM: {res.get('pixels_server_exit_code')}.",
            "",
        ]
    lines += [
        f"Machine: {m['cpu']}, {m['cores']} cores (server and client share them); torch "
        f"{m['torch']}, fastapi {m['fastapi']}, uvicorn {m['uvicorn']}, httpx {m['httpx']}, "
        f"redis-py {m['redis']}, {res.get('redis_server', 'no redis-server')}; commit "
        f"{m['commit']}; {m['date']}.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--work", default="artifacts/bench/reliability", help="world, model, index, logs"
    )
    p.add_argument("--entities", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="bench/results/reliability.json")
    p.add_argument("--phases", default="abcd", help="any of a, b, c, d")
    p.add_argument("--phase-timeout", type=float, default=120.0, help="seconds per phase")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--concurrency", type=int, default=16, help="phase a")
    p.add_argument("--valid-image", type=int, default=90, help="phase a: valid links with an image")
    p.add_argument("--valid-text", type=int, default=40, help="phase a: valid links, no image")
    p.add_argument("--invalid-each", type=int, default=10, help="phase a: requests per bad kind")
    p.add_argument("--redis-concurrency", type=int, default=4)
    p.add_argument("--redis-pool", type=int, default=8, help="phase b: distinct repeated mentions")
    p.add_argument("--redis-warm-s", type=float, default=3.0)
    p.add_argument("--redis-down-s", type=float, default=4.0)
    p.add_argument("--redis-after-s", type=float, default=2.0)
    p.add_argument("--flip-timeout", type=float, default=10.0, help="phase b: wait for a metric")
    p.add_argument("--scrape-interval", type=float, default=0.1)
    p.add_argument("--drain-requests", type=int, default=32, help="phase c")
    p.add_argument("--sigterm-after-ms", type=float, default=150.0)
    p.add_argument("--pixel-images", type=int, default=16, help="phase d")
    p.add_argument("--pixel-side", type=int, default=5000)
    p.add_argument(
        "--max-request-pixels", type=int, default=None, help="MEL_MAX_REQUEST_PIXELS (d)"
    )
    p.add_argument("--settle-s", type=float, default=5.0)
    p.add_argument("--strict", action="store_true", help="exit 1 when a phase is not OK")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from --results")
    a = p.parse_args(argv)
    path = Path(a.results)
    if a.render:
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return 0
    work = Path(a.work)
    world, model, index = ensure_artifacts(work, a.entities, a.seed)
    mentions = Mentions.load(world)
    redis_exe = shutil.which("redis-server")
    res: dict[str, Any] = {
        "machine": _machine.machine_info(
            ("torch", "faiss", "fastapi", "uvicorn", "httpx", "redis")
        ),
        "entities": json.loads((index / "manifest.json").read_text())["entity_count"],
        "work": str(work),
        "settings": {
            "phase_a_max_body_bytes": PHASE_A_BODY_LIMIT,
            "device": "cpu",
            "other": "server defaults (MEL_* cleared)",
        },
    }
    if redis_exe:
        res["redis_server"] = subprocess.run(
            [redis_exe, "--version"], capture_output=True, text=True, check=False
        ).stdout.split(" sha=")[0]
    counts = {
        "valid_image": a.valid_image,
        "valid_text": a.valid_text,
        "valid_form_upload": 2 * a.invalid_each,
        "valid_batch_mixed_items": a.invalid_each,
        "base64_wrapped_76": 2 * a.invalid_each,
        **{
            k: a.invalid_each
            for k in EXPECTED
            if not k.startswith("valid_") and k != "base64_wrapped_76"
        },
    }
    redis: Redis | None = None
    if set(a.phases) & set("abc"):
        env = {"MEL_MAX_BODY_BYTES": str(PHASE_A_BODY_LIMIT)}
        if redis_exe:
            redis = Redis(redis_exe, free_port())
            redis.start()
            env["MEL_REDIS_URL"] = f"redis://127.0.0.1:{redis.port}/0"
        server = Server(model, index, env, work / "server-abc.log")
        try:
            res["server_ready_s"] = round(
                wait_ready(server.proc, server.base, a.startup_timeout), 1
            )
            if "a" in a.phases:
                reqs = mixed_requests(mentions, counts, a.seed)
                res["mixed"] = asyncio.run(
                    phase_mixed(server.base, reqs, a.concurrency, a.phase_timeout)
                )
                logger.info(
                    "a: %s",
                    {k: res["mixed"][k] for k in ("server_errors_5xx", "connection_errors", "ok")},
                )
            if "b" in a.phases:
                if redis is None:
                    res["redis"] = {"skipped": "redis-server not installed"}
                else:
                    pool = mentions.take(a.redis_pool, image=False)
                    res["redis"] = asyncio.run(phase_redis(server.base, redis, pool, a))
                    logger.info(
                        "b: failed %s, ok %s", res["redis"]["failed_requests"], res["redis"]["ok"]
                    )
            if "c" in a.phases:
                bodies = mentions.take(a.drain_requests, image=True)
                res["sigterm"] = asyncio.run(phase_sigterm(server, bodies, a))
                logger.info("c: %s", res["sigterm"])
        finally:
            rc, _ = server.stop()
            res.setdefault("server_exit_code", rc)
            if redis is not None:
                redis.kill()
    if "d" in a.phases:
        pngs = big_pngs(work / "big-png", a.pixel_images, a.pixel_side)
        env = {}
        if a.max_request_pixels is not None:
            env["MEL_MAX_REQUEST_PIXELS"] = str(a.max_request_pixels)
        server = Server(model, index, env, work / "server-d.log")
        try:
            wait_ready(server.proc, server.base, a.startup_timeout)
            res["pixels"] = phase_pixels(server, pngs, a)
            logger.info("d: %s", res["pixels"])
        finally:
            res["pixels_server_exit_code"], _ = server.stop()
    res["ok"] = {k: res[k].get("ok") for k in ("mixed", "redis", "sigterm", "pixels") if k in res}
    print(_machine.write_results(path, res, markdown))
    return 1 if a.strict and not all(v is not False for v in res["ok"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
