"""Hot swaps and live updates under load: no request may fail.

Starts ``mel-serve`` on index folder A (the demo index), makes B (a copy of A with one live
update, so its ``index_version`` differs), then drives ``/v1/link`` with ``--concurrency``
clients for ``--seconds`` (each request a demo test mention with its image) while, every
``--swap-every`` seconds, the admin API swaps A <-> B, and in between adds and deletes an
entity live. Records every response: status, the ``index_version`` that answered, latency.

    python bench/swap_load.py --data artifacts/demo-world --model artifacts/demo-model/best \\
        --index artifacts/demo-index --out bench/results/swap.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine
from load_bench import free_port, load_items, stats_ms, stop_server, wait_ready

logger = logging.getLogger("swap_load")
ADMIN = {"X-Admin-Key": "bench-admin"}


def start(a: argparse.Namespace, index: Path, port: int, log: Path) -> Any:
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MEL_")}
    env.update({"MEL_DEVICE": "cpu", "MEL_ADMIN_KEYS": '["bench-admin"]'})
    cmd = [str(Path(sys.executable).parent / "mel-serve"), "--model", a.model, "--index"]
    cmd += [str(index), "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


async def drive(a: argparse.Namespace, base: str, bodies: list[bytes], b_index: Path) -> dict:
    seen: list[tuple[float, int, str, float]] = []
    events: list[dict[str, Any]] = []
    t_start = time.monotonic()
    stop = asyncio.Event()

    async def client(i: int) -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            j = i
            while not stop.is_set():
                body = bodies[j % len(bodies)]
                j += a.concurrency
                t0 = time.monotonic()
                try:
                    r = await c.post(
                        f"{base}/v1/link",
                        content=body,
                        headers={"content-type": "application/json"},
                    )
                    v = r.json().get("index_version", "") if r.status_code == 200 else r.text[:200]
                    seen.append((t0 - t_start, r.status_code, v, time.monotonic() - t0))
                except httpx.HTTPError as exc:
                    seen.append((t0 - t_start, 0, repr(exc), time.monotonic() - t0))

    async def admin() -> None:
        paths = [str(b_index), a.index]
        k = 0
        async with httpx.AsyncClient(timeout=120, headers=ADMIN) as c:
            while time.monotonic() - t_start < a.seconds - a.swap_every / 2:
                await asyncio.sleep(a.swap_every / 2)
                eid = f"bench-live-{k}"
                t0 = time.monotonic()
                r = await c.put(
                    f"{base}/v1/admin/entities/{eid}",
                    json={"name": f"Bench Entity {k}", "attributes": "added under load"},
                )
                events.append(
                    {"t": round(t0 - t_start, 2), "op": "upsert", "status": r.status_code,
                     "s": round(time.monotonic() - t0, 3)}
                )  # fmt: skip
                await c.delete(f"{base}/v1/admin/entities/{eid}")
                await asyncio.sleep(a.swap_every / 2)
                t0 = time.monotonic()
                r = await c.post(f"{base}/v1/admin/swap", json={"index_path": paths[k % 2]})
                events.append(
                    {"t": round(t0 - t_start, 2), "op": f"swap -> {Path(paths[k % 2]).name}",
                     "status": r.status_code, "s": round(time.monotonic() - t0, 3),
                     "index_version": r.json().get("index_version")}
                )  # fmt: skip
                k += 1

    tasks = [asyncio.create_task(client(i)) for i in range(a.concurrency)]
    admin_task = asyncio.create_task(admin())
    await asyncio.sleep(a.seconds)
    stop.set()
    await asyncio.gather(*tasks)
    await admin_task
    failed = [s for s in seen if s[1] != 200]
    lat = [s[3] for s in seen if s[1] == 200]
    versions: dict[str, int] = {}
    for s in seen:
        if s[1] == 200:
            versions[s[2]] = versions.get(s[2], 0) + 1
    return {
        "requests": len(seen),
        "failed": len(failed),
        "failures": [list(f) for f in failed[:20]],
        "throughput_rps": round(len(seen) / a.seconds, 2),
        "latency": stats_ms(lat),
        "versions": versions,
        "events": events,
    }


def markdown(res: dict[str, Any]) -> str:
    m, r = res["machine"], res["result"]
    lines = [
        "# Hot swaps and live updates under load (`bench/swap_load.py`)",
        "",
        f"{m['cpu']}, {m['cores']} cores; commit {m['commit']}; {m['date']}.",
        "",
        *([res["note"], ""] if res.get("note") else []),
        f"{res['concurrency']} concurrent clients for {res['seconds']} s, each request a demo "
        "test mention with its image (`/v1/link`, MIMIC), while the admin API swapped the "
        f"index every {res['swap_every']} s (A <-> B) and added and deleted an entity between "
        "swaps.",
        "",
        "| requests | failed | req/s | p50 ms | p99 ms | index versions answering |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {r['requests']} | **{r['failed']}** | {r['throughput_rps']} | "
        f"{r['latency'].get('p50_ms')} | {r['latency'].get('p99_ms')} | "
        + ", ".join(f"`{v}`: {n}" for v, n in r["versions"].items())
        + " |",
        "",
        "| t (s) | admin call | status | seconds |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {e['t']} | {e['op']} | {e['status']} | {e['s']} |" for e in r["events"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="artifacts/demo-world")
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--index", default="artifacts/demo-index")
    p.add_argument("--work", default="artifacts/bench/swap")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--swap-every", type=float, default=15.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/swap.json"))
    p.add_argument("--note", default="", help="a line printed under the title (conditions)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    b_index = work / "index-b"
    shutil.copytree(
        a.index, b_index, ignore=shutil.ignore_patterns("live", "uploads", ".live.lock")
    )
    bodies = load_items(Path(a.data), "test")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # B differs from A by one live entity (its own index_version), added through B's server
    proc = start(a, b_index, port, work / "server-b.log")
    try:
        wait_ready(proc, base, 300)
        httpx.put(
            f"{base}/v1/admin/entities/bench-b", json={"name": "Index B marker"}, headers=ADMIN
        ).raise_for_status()
    finally:
        stop_server(proc)
    proc = start(a, Path(a.index), port, work / "server.log")
    try:
        wait_ready(proc, base, 300)
        res = asyncio.run(drive(a, base, bodies, b_index))
    finally:
        code = stop_server(proc)
    out = {
        "machine": _machine.machine_info(("torch", "faiss", "fastapi", "uvicorn", "httpx")),
        "concurrency": a.concurrency,
        "seconds": a.seconds,
        "swap_every": a.swap_every,
        "note": a.note,
        "server_exit": code,
        "result": res,
    }
    print(_machine.write_results(a.out, out, markdown))
    return 0 if res["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
