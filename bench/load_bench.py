"""Load benchmark of the linking server: latency, throughput, batching and cache, on loopback.

    python bench/load_bench.py --model artifacts/demo-model/best --data artifacts/demo-world

Starts ``mel-serve`` as a separate process on 127.0.0.1 (a free port; the in-process LRU
cache, no Redis) over a Flat index of the demo world (built with ``mel-index build`` under
``--index`` if missing), waits for ``/readyz``, and drives it with httpx from this process.
Every request is a real test-split mention of the demo world WITH its image (base64), and
every mention is sent in one phase only, so a miss is a real decode + encode + retrieve +
rerank. Phases, each bounded by a request count and ``--phase-timeout`` seconds:

1. single ``/v1/link`` calls at concurrency 1, then 16 (p50/p95/p99 latency, req/s);
2. 32 items in one ``/v1/link/batch`` call vs 32 other items as sequential ``/v1/link``
   calls (wall time each, ratio; ``--batch-rounds`` rounds, order alternated, medians);
3. cache: a fresh request (miss) then the identical request repeated (result-cache hits).

Then it scrapes ``/metrics`` (per-stage mean latencies = ``mel_stage_seconds`` sum / count),
stops the server (SIGTERM, wait) and writes ``--results`` (JSON) and the markdown beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import httpx
import numpy as np

logger = logging.getLogger("load_bench")

HEADERS = {"content-type": "application/json"}


# --------------------------------------------------------------------------- environment
def machine_info() -> dict[str, Any]:
    return _machine.machine_info(("torch", "faiss", "fastapi", "uvicorn", "httpx"))


def stats_ms(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds of latencies given in seconds."""
    if not values:
        return {"n": 0}
    a = 1000 * np.asarray(values, dtype=np.float64)
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p95_ms": round(float(np.percentile(a, 95)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


# --------------------------------------------------------------------------- inputs
def load_items(data: Path, split: str) -> list[bytes]:
    """JSON bodies of the split's mentions that have an image (the image inlined as base64)."""
    ids = json.loads((data / "splits.json").read_text())[split]
    by_id = {}
    with open(data / "mentions.jsonl", encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            by_id[m["id"]] = m
    bodies = []
    for mid in ids:
        m = by_id.get(mid)
        if m is None or not m.get("image"):
            continue
        img = base64.b64encode((data / m["image"]).read_bytes()).decode("ascii")
        bodies.append(
            json.dumps({"mention": m["mention"], "sentence": m["sentence"], "image": img}).encode()
        )
    return bodies


def ensure_index(a: argparse.Namespace) -> None:
    if (Path(a.index) / "manifest.json").is_file():
        return
    mel_index = Path(sys.executable).parent / "mel-index"
    cmd = [str(mel_index), "build", "--kb", str(Path(a.data) / "kb.jsonl"), "--model", a.model]
    cmd += ["--out", a.index, "--factory", "Flat", "--no-progress"]
    logger.info("building the bench index: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


# --------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(a: argparse.Namespace, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEL_")}
    env.update({"MEL_DEVICE": "cpu", "MEL_LRU_SIZE": "10000"})
    if a.server_threads:
        env["MEL_INTRA_OP_THREADS"] = str(a.server_threads)
    env.update(server_env(a.server_env))
    mel_serve = Path(sys.executable).parent / "mel-serve"
    cmd = [str(mel_serve), "--model", a.model, "--index", a.index, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "warning"]
    for flag, path in (("--drin", a.drin), ("--fusion", a.fusion)):
        if path:  # with fusion loaded it is the default reranker (as in make demo)
            cmd += [flag, path]
    logger.info("starting %s", " ".join(cmd))
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def server_env(pairs: list[str]) -> dict[str, str]:
    """``--server-env KEY=VALUE`` pairs (MEL_* settings for the server) as a dict."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("MEL_"):
            raise SystemExit(f"--server-env wants MEL_NAME=value, got {pair!r}")
        out[key] = value
    return out


def server_settings(overrides: dict[str, str]) -> dict[str, Any]:
    """The batching settings the server runs with: the defaults (its MEL_* env is cleared)
    but for ``overrides`` (``--server-env``)."""
    from service.settings import ServiceSettings

    f = ServiceSettings.model_fields
    out = {k: f[k].default for k in ("max_batch_size", "max_wait_ms", "queue_size")}
    for k in out:
        if f"MEL_{k.upper()}" in overrides:
            out[k] = type(out[k])(overrides[f"MEL_{k.upper()}"])
    return out


def wait_ready(proc: subprocess.Popen[bytes], base: str, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mel-serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mel-serve not ready within {timeout}s")


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)


# --------------------------------------------------------------------------- phases
class Items:
    """Hands out each mention once, so no phase is helped by another phase's cache entries."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies, self.next = bodies, 0

    def take(self, n: int) -> list[bytes]:
        if self.next + n > len(self.bodies):
            raise SystemExit(f"out of distinct mentions ({len(self.bodies)}); lower the counts")
        out = self.bodies[self.next : self.next + n]
        self.next += n
        return out


async def post_link(client: httpx.AsyncClient, body: bytes) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    r = await client.post("/v1/link", content=body, headers=HEADERS)
    secs = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"/v1/link answered {r.status_code}: {r.text[:300]}")
    return secs, r.json()


async def single_calls(
    client: httpx.AsyncClient, bodies: list[bytes], concurrency: int, timeout: float
) -> dict[str, Any]:
    """Every body once, ``concurrency`` requests in flight; stops early at ``timeout``."""
    queue = list(reversed(bodies))
    lat: list[float] = []
    server: list[dict[str, Any]] = []
    deadline = time.perf_counter() + timeout

    async def worker() -> None:
        while queue and time.perf_counter() < deadline:
            secs, res = await post_link(client, queue.pop())
            lat.append(secs)
            server.append(res["timings"])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    assert not any(t["cached"] for t in server), "a miss phase hit the cache"
    return {
        "concurrency": concurrency,
        **stats_ms(lat),
        "wall_s": round(wall, 2),
        "req_per_s": round(len(lat) / wall, 2),
        "server_encode_ms_p50": round(statistics.median(t["encode_ms"] for t in server), 2),
        "server_queue_ms_p50": round(statistics.median(t["queue_ms"] for t in server), 2),
        "server_batch_size_mean": round(statistics.mean(t["batch_size"] for t in server), 2),
    }


async def batch_vs_sequential(
    client: httpx.AsyncClient, items: Items, size: int, rounds: int, timeout: float
) -> dict[str, Any]:
    batch_s: list[float] = []
    seq_s: list[float] = []
    deadline = time.perf_counter() + timeout

    async def one_batch() -> None:
        body = b'{"items": [' + b", ".join(items.take(size)) + b"]}"
        t = time.perf_counter()
        r = await client.post("/v1/link/batch", content=body, headers=HEADERS)
        batch_s.append(time.perf_counter() - t)
        results = r.json()["results"]
        if r.status_code != 200 or any("result" not in x or x["result"] is None for x in results):
            raise RuntimeError(f"/v1/link/batch failed: {r.status_code} {r.text[:300]}")
        assert not any(x["result"]["timings"]["cached"] for x in results)

    async def sequential() -> None:
        t = time.perf_counter()
        for body in items.take(size):
            _, res = await post_link(client, body)
            assert not res["timings"]["cached"]
        seq_s.append(time.perf_counter() - t)

    for r in range(rounds):
        if time.perf_counter() > deadline:
            break
        first, second = (one_batch, sequential) if r % 2 == 0 else (sequential, one_batch)
        await first()
        await second()
    b, s = statistics.median(batch_s), statistics.median(seq_s)
    return {
        "items": size,
        "rounds": len(batch_s),
        "batch_call_s": [round(x, 3) for x in batch_s],
        "sequential_calls_s": [round(x, 3) for x in seq_s],
        "batch_call_s_median": round(b, 3),
        "sequential_s_median": round(s, 3),
        "speedup": round(s / b, 2),
    }


async def cache_hit_vs_miss(
    client: httpx.AsyncClient, bodies: list[bytes], repeats: int, timeout: float
) -> dict[str, Any]:
    miss: list[float] = []
    hit: list[float] = []
    deadline = time.perf_counter() + timeout
    for body in bodies:
        if time.perf_counter() > deadline:
            break
        secs, res = await post_link(client, body)
        assert not res["timings"]["cached"]
        miss.append(secs)
        for _ in range(repeats):
            secs, res = await post_link(client, body)
            assert res["timings"]["cached"], "an identical repeat missed the cache"
            hit.append(secs)
    m, h = statistics.median(miss), statistics.median(hit)
    return {
        "miss": stats_ms(miss),
        "hit": stats_ms(hit),
        "hit_over_miss": round(h / m, 4),
    }


# --------------------------------------------------------------------------- metrics
_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, Any]:
    """Per-stage mean latency (sum / count), mean model batch size, cache counters."""
    samples: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            samples[(m.group(1), m.group(2) or "")] = float(m.group(3))
    stages = {}
    for (name, labels), count in samples.items():
        if name == "mel_stage_seconds_count" and count:
            total = samples[("mel_stage_seconds_sum", labels)]
            stage = labels.split('"')[1]
            stages[stage] = {"count": int(count), "mean_ms": round(1000 * total / count, 2)}
    cache = {
        labels.replace('"', ""): int(v)
        for (name, labels), v in samples.items()
        if name == "mel_cache_requests_total"
    }
    bs_n = samples.get(("mel_batch_size_count", ""), 0.0)
    return {
        "stages": stages,
        "model_batches": int(bs_n),
        "mean_model_batch_size": round(samples.get(("mel_batch_size_sum", ""), 0.0) / bs_n, 2)
        if bs_n
        else None,
        "cache_requests": cache,
    }


# --------------------------------------------------------------------------- main
async def drive(a: argparse.Namespace, base: str, items: Items) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        for body in items.take(a.warmup):  # connections, first-request paths
            await post_link(client, body)
        out: dict[str, Any] = {}
        out["single_c1"] = await single_calls(client, items.take(a.single), 1, a.phase_timeout)
        logger.info("concurrency 1: %s", out["single_c1"])
        out["single_c16"] = await single_calls(
            client, items.take(a.concurrent), 16, a.phase_timeout
        )
        logger.info("concurrency 16: %s", out["single_c16"])
        for level in a.levels:
            out[f"single_c{level}"] = await single_calls(
                client, items.take(a.level_requests), level, a.phase_timeout
            )
            logger.info("concurrency %d: %s", level, out[f"single_c{level}"])
        out["batch"] = await batch_vs_sequential(
            client, items, a.batch_items, a.batch_rounds, a.phase_timeout
        )
        logger.info("batch: %s", out["batch"])
        out["cache"] = await cache_hit_vs_miss(
            client, items.take(a.cache_items), a.cache_repeats, a.phase_timeout
        )
        logger.info("cache: %s", out["cache"])
        r = await client.get("/metrics")
        out["metrics"] = parse_metrics(r.text)
    return out


def _reranker_label(name: str) -> str:
    if name == "fusion":
        return "fusion (MIMIC over the dense + lexical candidates, then the fusion ranker)"
    return "MIMIC" if name == "mimic" else name


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    b, c, met = res["batch"], res["cache"], res["metrics"]
    lines = [
        f"Server: `mel-serve` on 127.0.0.1 (1 uvicorn worker, in-process LRU cache, "
        f"MEL_MAX_BATCH_SIZE={res['settings']['max_batch_size']}, "
        f"MEL_MAX_WAIT_MS={res['settings']['max_wait_ms']}, MEL_INTRA_OP_THREADS="
        f"{res['settings'].get('intra_op_threads') or 'unset'}: ran "
        f"{res['settings'].get('ran_model_workers', '?')} model worker(s) x "
        f"{res['settings'].get('ran_intra_op_threads', '?')} thread(s), models/threads.py), "
        "Flat index of the demo world "
        f"({res['index_entities']:,} entities)"
        + "".join(
            f", {k}={v}"
            for k, v in res["settings"].get("server_env", {}).items()
            if k not in ("MEL_MAX_WAIT_MS", "MEL_MAX_BATCH_SIZE")
        )
        + "; client: httpx (async) in a second process on "
        f"the same machine. Every request: a distinct demo test mention with its image "
        f"(base64), top_k 10, 100 candidates reranked by "
        f"{_reranker_label(res['settings'].get('reranker', 'mimic'))}, unless it is a cache hit.",
        "",
        "| measurement | n | p50 ms | p95 ms | p99 ms | throughput |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    levels = sorted(int(k[len("single_c") :]) for k in res if k.startswith("single_c"))
    for level in levels:
        s, label = res[f"single_c{level}"], f"`/v1/link`, concurrency {level}"
        lines.append(
            f"| {label} (mean model batch {s['server_batch_size_mean']:.1f}) | {s['n']} | "
            f"{s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | "
            f"{s['req_per_s']:.1f} req/s |"
        )
    lines += [
        f"| cache miss (fresh request, concurrency 1) | {c['miss']['n']} | "
        f"{c['miss']['p50_ms']:.1f} | {c['miss']['p95_ms']:.1f} | {c['miss']['p99_ms']:.1f} | |",
        f"| cache hit (identical repeat) | {c['hit']['n']} | {c['hit']['p50_ms']:.2f} | "
        f"{c['hit']['p95_ms']:.2f} | {c['hit']['p99_ms']:.2f} | |",
        "",
        "| comparison | result | goal |",
        "| --- | --- | --- |",
        f"| {b['items']} items: one `/v1/link/batch` call vs {b['items']} sequential "
        f"`/v1/link` calls (median of {b['rounds']} rounds, fresh items each) | "
        f"{b['batch_call_s_median']:.2f} s vs {b['sequential_s_median']:.2f} s: "
        f"**{b['speedup']:.2f}x** (rounds: "
        + ", ".join(
            f"{q / x:.2f}x" for q, x in zip(b["sequential_calls_s"], b["batch_call_s"], strict=True)
        )
        + ") | >= 2x |",
        f"| cache hit / miss (medians) | {c['hit']['p50_ms']:.2f} ms / "
        f"{c['miss']['p50_ms']:.1f} ms = **{100 * c['hit_over_miss']:.1f}%** | <= 5% |",
        "",
        "Server-side stage means from `/metrics` at the end of the run (`mel_stage_seconds` "
        "sum / count over all phases; encode, retrieve and rerank are per model batch of "
        f"mean size {met['mean_model_batch_size']}, decode and total per request, total "
        "including cache hits):",
        "",
        "| stage | count | mean ms |",
        "| --- | --- | --- |",
    ]
    for stage in ("decode", "encode", "retrieve", "rerank", "total"):
        s = met["stages"].get(stage)
        if s:
            lines.append(f"| {stage} | {s['count']} | {s['mean_ms']:.2f} |")
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (server and client share them); torch "
        f"{m['torch']}, faiss {m['faiss']}, fastapi {m['fastapi']}, uvicorn {m['uvicorn']}, "
        f"httpx {m['httpx']}; commit {m['commit']}; {m['date']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--data", default="artifacts/demo-world", help="demo world (mentions, KB)")
    p.add_argument("--index", default="artifacts/bench/demo-index-flat", help="built if missing")
    p.add_argument("--split", default="test")
    p.add_argument("--results", default="bench/results/service.json")
    p.add_argument("--log", default="artifacts/bench/load-bench-server.log")
    p.add_argument("--warmup", type=int, default=8, help="requests before measuring")
    p.add_argument("--single", type=int, default=150, help="requests at concurrency 1")
    p.add_argument("--concurrent", type=int, default=320, help="requests at concurrency 16")
    p.add_argument("--batch-items", type=int, default=32)
    p.add_argument("--batch-rounds", type=int, default=4)
    p.add_argument("--cache-items", type=int, default=40)
    p.add_argument("--cache-repeats", type=int, default=5)
    p.add_argument("--phase-timeout", type=float, default=180.0, help="seconds per phase")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--server-threads", type=int, help="the server's MEL_INTRA_OP_THREADS")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="MEL_NAME=VALUE",
        help="a setting for the server (repeatable), e.g. MEL_MAX_WAIT_MS=0",
    )
    p.add_argument(
        "--levels",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[],
        help="more concurrency levels after 1 and 16, e.g. 2,4,8",
    )
    p.add_argument("--level-requests", type=int, default=120, help="requests per extra level")
    p.add_argument("--drin", help="a DRIN model folder for mel-serve --drin")
    p.add_argument(
        "--fusion",
        help="a fusion model folder for mel-serve --fusion: requests then get fusion, the "
        "server's default when it is loaded (the index must have the lexical channel)",
    )
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from --results")
    a = p.parse_args(argv)
    path = Path(a.results)
    if a.render:
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return 0
    ensure_index(a)
    manifest = json.loads((Path(a.index) / "manifest.json").read_text())
    items = Items(load_items(Path(a.data), a.split))
    logger.info("%d distinct %s mentions with an image", len(items.bodies), a.split)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    proc = start_server(a, port, Path(a.log))
    try:
        ready_s = wait_ready(proc, base, a.startup_timeout)
        logger.info("server ready in %.1fs", ready_s)
        ready = httpx.get(base + "/readyz", timeout=5).json()  # the workers / threads chosen
        res = asyncio.run(drive(a, base, items))
    finally:
        rc = stop_server(proc)
        logger.info("server stopped (exit %s)", rc)
    res = {
        "machine": machine_info(),
        "settings": {
            **server_settings(server_env(a.server_env)),
            "server_env": server_env(a.server_env),
            "cache": "in-process LRU",
            "device": "cpu",
            "intra_op_threads": a.server_threads,
            "ran_model_workers": ready.get("model_workers"),
            "ran_intra_op_threads": ready.get("intra_op_threads"),
            "reranker": ready.get("default_reranker") or ("fusion" if a.fusion else "mimic"),
            "drin": a.drin,
            "fusion": a.fusion,
        },
        "index": a.index,
        "index_entities": manifest["entity_count"],
        "index_factory": manifest["factory"],
        "model": a.model,
        "server_ready_s": round(ready_s, 1),
        "server_exit_code": rc,
        "distinct_mentions_used": items.next,
        **res,
    }
    print(_machine.write_results(path, res, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
