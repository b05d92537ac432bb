"""Bulk linking throughput: ``mel-link`` against the server's ``/v1/link/batch``, same mentions.

    python bench/bulk_bench.py --model artifacts/demo-model/best --data artifacts/demo-world \\
                               --index artifacts/demo-index        # ~10 min on 2 cores

The mentions: the demo world's test split (1,200, 946 with an image) ``--repeat`` times over
(default 4: 4,800, ids made unique), cut into ``--blocks`` blocks (default 2 of 2,400). One server (``python -m service.cli``, a separate process, 127.0.0.1, default batching
MEL_MAX_BATCH_SIZE=32 / MEL_MAX_WAIT_MS=5 when it ran, 0 now, ``MEL_CACHE_TTL_S=0`` so nothing is answered from
the cache) stays up for the whole run. Block by block, alternating which goes first (the
machine is shared, so both see the same minutes of load):

* server: the block through ``/v1/link/batch`` calls of ``--batch-items`` items (images
  inlined as base64, bodies built before timing), with ``--inflight`` calls in flight (httpx,
  async, this process; default 4, which beat 1 and 2 in every round of an earlier run);
  mentions/s = mentions / wall. The server's best is the best of those settings.
* mel-link: ``python -m service.bulk`` on the block's mentions file (a separate process, fresh
  output); mentions/s from its own report (linking only, after its warm-up) and from the whole
  command's wall time (model and index load included).

Both use the same model, index, reranker (the default, MIMIC here), top_k 10 and 100
candidates; torch gets the machine's 2 cores in both (the client and the idle server share
them during the other's turn).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py (bench/ is on sys.path when a script runs)
import httpx
from load_bench import free_port, stop_server, wait_ready

logger = logging.getLogger("bulk_bench")
ROOT = Path(__file__).resolve().parents[1]


def mentions_file(data: Path, split: str, out: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The split's mentions as a canonical mentions file whose image paths resolve."""
    ids = json.loads((data / "splits.json").read_text())[split]
    by_id = {}
    for line in (data / "mentions.jsonl").read_text().splitlines():
        m = json.loads(line)
        by_id[m["id"]] = m
    ms = [by_id[i] for i in ids if i in by_id]
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "images").exists():
        (out / "images").symlink_to((data / "images").resolve())
    path = out / f"{split}-mentions.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in ms))
    return path, ms


def batch_bodies(data: Path, ms: list[dict[str, Any]], items: int) -> list[bytes]:
    bodies = []
    for s in range(0, len(ms), items):
        batch = []
        for m in ms[s : s + items]:
            it: dict[str, Any] = {"mention": m["mention"], "sentence": m["sentence"]}
            if m.get("span"):
                it["span"] = m["span"]
            if m.get("image"):
                it["image"] = base64.b64encode((data / m["image"]).read_bytes()).decode()
            batch.append(it)
        bodies.append(json.dumps({"items": batch}).encode())
    return bodies


async def run_server(base: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    queue = list(enumerate(bodies))
    errors = 0
    answered = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors, answered
        while queue:
            _, body = queue.pop(0)
            r = await client.post(
                "/v1/link/batch", content=body, headers={"content-type": "application/json"}
            )
            if r.status_code != 200:
                raise RuntimeError(f"/v1/link/batch answered {r.status_code}: {r.text[:300]}")
            for item in r.json()["results"]:
                answered += 1
                errors += item.get("error") is not None

    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        t = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        secs = time.perf_counter() - t
    return {
        "concurrency": concurrency,
        "seconds": round(secs, 2),
        "answered": answered,
        "errors": errors,
        "mentions_per_s": round(answered / secs, 2),
    }


def run_bulk(a: argparse.Namespace, inp: Path, out: Path, env: dict[str, str]) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "service.bulk", "--in", str(inp), "--out", str(out)]
    cmd += ["--model", a.model, "--index", a.index, "--device", "cpu", "--no-progress"]
    cmd += ["--batch-size", str(a.bulk_batch), "--restart"]
    if a.bulk_threads:
        cmd += ["--threads", str(a.bulk_threads)]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"mel-link failed: {r.stderr[-2000:]}")
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    lines = out.read_text().splitlines()
    ran = re.search(r"intra-op threads: (\d+)", r.stderr)  # models/threads.py's log line
    plan = re.search(r"mel-link: (\d+) worker", r.stderr)
    return {
        "batch_size": a.bulk_batch,
        "threads": a.bulk_threads,
        "threads_used": int(ran.group(1)) if ran else None,
        "workers_used": int(plan.group(1)) if plan else None,
        "linking_seconds": round(rep["seconds"], 2),
        "command_seconds": round(wall, 2),
        "lines": len(lines),
        "errors": rep["errors"],
        "mentions_per_s": round(rep["written"] / rep["seconds"], 2),
        "mentions_per_s_with_load": round(rep["written"] / wall, 2),
    }


def markdown(res: dict[str, Any]) -> str:
    best = res["server_best"]
    lines = [
        f"**Bulk linking: `mel-link` vs `/v1/link/batch`** ({res['mentions']:,} demo test "
        f"mentions (the split {res.get('repeat', 1)} times over), {res['with_image']:,} with an "
        f"image, in {len(res['blocks'])} blocks; "
        f"{res['index_entities']:,}-entity {res['index_factory']} index; reranker "
        f"{res['reranker']}, top_k 10, 100 candidates; order alternated per block)",
        "",
        "| block | first | "
        + " | ".join(f"server, {c} in flight" for c in res["server_by_concurrency"])
        + " | mel-link (linking) | mel-link (whole command) |",
        "| --- | --- | " + "--- | " * len(res["server_by_concurrency"]) + "--- | --- |",
    ]
    for i, r in enumerate(res["blocks"], start=1):
        s = " | ".join(f"{x['mentions_per_s']:.1f}" for x in r["server"])
        b = r["bulk"]
        lines.append(
            f"| {i} | {r['first']} | {s} | {b['mentions_per_s']:.1f} | "
            f"{b['mentions_per_s_with_load']:.1f} |"
        )
    lines += [
        "",
        f"Mentions/s over all blocks (mentions / summed seconds): server best ({best['concurrency']}"
        f" in flight) **{best['mentions_per_s']:.1f}**, mel-link **{res['bulk_rate']:.1f}** "
        f"linking, {res['bulk_rate_with_load']:.1f} with its start-up: **{res['ratio']:.2f}x** "
        f"the server's best (goal >= 1x). Server: {res['server']}.",
        "",
        f"mel-link intra-op threads: {res['blocks'][0]['bulk'].get('threads') or 'its default'}"
        f" (ran {sorted({b['bulk'].get('workers_used') for b in res['blocks']}, key=str)} "
        f"worker(s) x {sorted({b['bulk'].get('threads_used') for b in res['blocks']}, key=str)}"
        " thread(s), models/threads.py plan_workers)"
        f"; the server's: {res.get('server_threads') or 'its default'} (ran with "
        f"{res.get('server_threads_used')}; default: the cores free at start, models/threads.py).",
        "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; torch "
        f"{res['machine']['torch']}, faiss "
        f"{res['machine']['faiss']}; commit {res['machine']['commit']}; {res['machine']['date']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--data", default="artifacts/demo-world")
    p.add_argument("--index", default="artifacts/demo-index")
    p.add_argument("--split", default="test")
    p.add_argument("--work", default="artifacts/bench/bulk")
    p.add_argument("--results", default="bench/results/bulk.json")
    p.add_argument(
        "--blocks",
        type=int,
        default=2,
        help="interleaved blocks of mentions (default 2: 2,400-line blocks; every mel-link run "
        "pays ~1.2 s of pipeline fill and drain, 10%% of a 960-line block's linking time)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=4,
        help="the split's mentions this many times over (bulk-sized blocks: a 240-line block "
        "is mostly mel-link's pipeline filling and draining)",
    )
    p.add_argument(
        "--inflight",
        type=int,
        nargs="+",
        default=[4],
        help="batch calls in flight (an earlier run: 4 beat 1 and 2 in every round)",
    )
    p.add_argument("--batch-items", type=int, default=32, help="items per /v1/link/batch call")
    p.add_argument("--bulk-batch", type=int, default=32, help="mel-link --batch-size")
    p.add_argument("--bulk-threads", type=int, help="mel-link --threads (default: its own)")
    p.add_argument("--server-threads", type=int, help="the server's MEL_INTRA_OP_THREADS")
    p.add_argument("--render", action="store_true")
    a = p.parse_args(argv)
    path = Path(a.results)
    if a.render:
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return 0
    data, work = Path(a.data), Path(a.work)
    _, once = mentions_file(data, a.split, work)
    ms = [dict(m, id=f"{m['id']}#{r}") for r in range(a.repeat) for m in once]
    size = -(-len(ms) // a.blocks)
    blocks = []
    for i in range(0, len(ms), size):
        f = work / f"block-{i // size}.jsonl"
        f.write_text("".join(json.dumps(m) + "\n" for m in ms[i : i + size]))
        blocks.append((f, batch_bodies(data, ms[i : i + size], a.batch_items)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEL_")}
    env.update(PYTHONPATH=str(ROOT), MEL_DEVICE="cpu", MEL_CACHE_TTL_S="0")
    server_env = dict(env)
    if a.server_threads:
        server_env["MEL_INTRA_OP_THREADS"] = str(a.server_threads)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "service.cli", "--model", a.model, "--index", a.index]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = open(work / "server.log", "wb")  # noqa: SIM115 (the server's lifetime)
    proc = subprocess.Popen(cmd, env=server_env, stdout=log, stderr=subprocess.STDOUT)
    recs = []
    try:
        wait_ready(proc, base, 300)
        ready = httpx.get(base + "/readyz").json()
        asyncio.run(run_server(base, blocks[0][1][:2], 1))  # warm-up
        for i, (f, bodies) in enumerate(blocks):
            first = "server" if i % 2 == 0 else "mel-link"
            rec: dict[str, Any] = {"first": first}
            for what in [first, "mel-link" if first == "server" else "server"]:
                if what == "server":
                    rec["server"] = [asyncio.run(run_server(base, bodies, c)) for c in a.inflight]
                else:
                    rec["bulk"] = run_bulk(a, f, work / "links.jsonl", env)
            logger.info("block %d: %s", i, rec)
            recs.append(rec)
    finally:
        rc = stop_server(proc)
        log.close()

    def rate(c: int) -> float:
        xs = [x for r in recs for x in r["server"] if x["concurrency"] == c]
        return sum(x["answered"] for x in xs) / sum(x["seconds"] for x in xs)

    by_c = {c: round(rate(c), 2) for c in a.inflight}
    best_c = max(by_c, key=by_c.__getitem__)
    n = sum(r["bulk"]["lines"] for r in recs)
    bulk_rate = n / sum(r["bulk"]["linking_seconds"] for r in recs)
    res = {
        "mentions": len(ms),
        "repeat": a.repeat,
        "with_image": sum(bool(m.get("image")) for m in ms),
        "index_entities": ready.get("entities"),
        "index_factory": json.loads((Path(a.index) / "manifest.json").read_text())["factory"],
        "reranker": ready.get("default_reranker"),
        "server": f"python -m service.cli, 1 uvicorn worker, MEL_CACHE_TTL_S=0 (no cache hits), "
        f"default batching; {a.batch_items} items per batch call; exit code {rc}",
        "blocks": recs,
        "server_by_concurrency": by_c,
        "server_best": {"concurrency": best_c, "mentions_per_s": by_c[best_c]},
        "server_threads": a.server_threads,
        "server_threads_used": ready.get("intra_op_threads"),
        "bulk_rate": round(bulk_rate, 2),
        "bulk_rate_with_load": round(n / sum(r["bulk"]["command_seconds"] for r in recs), 2),
        "ratio": round(bulk_rate / by_c[best_c], 3),
        "machine": _machine.machine_info(("torch", "faiss", "fastapi", "uvicorn", "httpx")),
    }
    print(_machine.write_results(path, res, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
