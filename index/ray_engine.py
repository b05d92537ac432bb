"""``mel-index build --engine ray``: the chunk plan of a build run by a Ray actor pool.

The same job as :func:`index.build.encode_shard`, spread over a Ray cluster: the driver reads
``kb.jsonl`` once, in the job's chunks (:func:`index.reader.iter_raw_chunks`), skips the chunks
an earlier run finished, and hands the others' raw lines to a pool of :class:`ChunkActor`\\ s.
Each actor loads the model once, parses, encodes (:class:`index.encode.ChunkEncoder`, the very
encoder of a local build) and writes its chunk folder atomically (:func:`index.writer.write_chunk`)
under ``<out>/chunks``; the driver then runs the usual :func:`index.assemble.finalize`. So the
folder is byte for byte the one a single-process build writes.

Faults: an actor whose process dies (OOM, a lost node, a SIGKILL) is restarted by Ray, which
loads the model again and retries the chunk it was working on (``max_restarts`` /
``max_task_retries``). A chunk folder exists only once complete (renamed from ``.tmp``), a
retried chunk overwrites its own half-written ``.tmp``, and the merge refuses duplicate chunks,
so nothing is lost or written twice. A killed driver is resumed like a local build: re-run the
same command, finished chunks are skipped.

Resources: one actor per GPU (``num_gpus=1`` each) when the cluster has GPUs, else one per
``cpus_per_actor`` CPUs, each running torch with that many threads. Every actor needs the KB's
images (paths relative to the KB file) and ``--out`` on a filesystem it can reach: on a
multi-node cluster, a shared one. Ray is an optional dependency (``pip install '.[ray]'``);
only this module imports it, and only ``--engine ray`` imports this module.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index.errors import IndexBuildError

logger = logging.getLogger(__name__)

# A retried chunk runs again from its raw lines: losing an actor costs one chunk of work.
MAX_RESTARTS = 8
MAX_TASK_RETRIES = 8


class RayUnavailableError(IndexBuildError):
    """``--engine ray`` without Ray installed, or with no cluster to reach."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray build runs."""

    # None: $RAY_ADDRESS when set (an existing cluster, e.g. "auto" or "ray://head:10001"),
    # else a local Ray instance started for this build (and stopped after it)
    address: str | None = None
    actors: int | None = None  # None: one per GPU, else cluster CPUs // cpus_per_actor
    cpus_per_actor: int = 1  # torch intra-op threads of each actor
    in_flight: int = 2  # chunks queued per actor: its next chunk is there when it finishes


def add_ray_arguments(parser: Any) -> None:
    """``--ray-address / --ray-actors / --ray-cpus-per-actor`` (mel-index build, mel-link);
    :func:`ray_options` reads them back."""
    parser.add_argument(
        "--ray-address",
        help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray for this run)",
    )
    parser.add_argument(
        "--ray-actors",
        type=int,
        help="actors (default: one per GPU, else CPUs / --ray-cpus-per-actor)",
    )
    parser.add_argument(
        "--ray-cpus-per-actor",
        type=int,
        default=1,
        help="CPUs of each actor (its torch / onnxruntime threads)",
    )


def ray_options(a: Any) -> RayOptions:
    """The :class:`RayOptions` of parsed :func:`add_ray_arguments` flags."""
    if a.ray_actors is not None and a.ray_actors < 1:
        raise ValueError("--ray-actors must be >= 1")
    if a.ray_cpus_per_actor < 1:
        raise ValueError("--ray-cpus-per-actor must be >= 1")
    return RayOptions(
        address=a.ray_address, actors=a.ray_actors, cpus_per_actor=a.ray_cpus_per_actor
    )


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(
            "--engine ray needs Ray: pip install 'mel-service[ray]' (or pip install ray)"
        ) from exc
    return ray


class ChunkActor:
    """One model, loaded once; encodes and writes whole chunks (the body of a Ray actor)."""

    def __init__(
        self,
        model_path: str,
        image_root: str,
        out: str,
        batch_size: int,
        workers: int,
        device: str,
        drin_fields: bool,
        threads: int,
        runtime: str = "torch",
        onnx_cache: str | None = None,
    ) -> None:
        import torch

        from index.build import activate_runtime
        from index.encode import ChunkEncoder
        from models.device import resolve_device
        from models.model import LinkingModel

        torch.set_num_threads(max(1, threads))
        model = LinkingModel.from_pretrained(model_path)
        dev = resolve_device(device)
        # the driver's runtime (the towers already exported into the shared ONNX cache)
        activate_runtime(model, runtime, model_path, onnx_cache, max(1, threads), dev)
        self.encoder = ChunkEncoder(model, Path(image_root), batch_size, workers, dev, drin_fields)
        self.out = Path(out)

    def encode_chunk(self, chunk: int, first_line: int, lines: list[bytes]) -> dict[str, Any]:
        """Parse, encode and write one chunk; returns what the driver counts."""
        from index.reader import KBChunk, parse_lines
        from index.writer import DONE_FILE, chunk_folder, is_complete, write_chunk
        from models.data.schema import RecordReport

        t0 = time.perf_counter()
        folder = chunk_folder(self.out, chunk)
        if is_complete(folder):  # a retry of a chunk whose actor died after writing it
            n = int((folder / DONE_FILE).read_text())
            return {
                "chunk": chunk,
                "lines": len(lines),
                "entities": n,
                "seconds": 0.0,
                "pid": os.getpid(),
            }
        report = RecordReport()
        c = KBChunk(chunk, len(lines), parse_lines(lines, first_line, report), report)
        fields = self.encoder.encode(c.entities, c.report)
        write_chunk(folder, c.entities, fields, c.report)
        return {
            "chunk": chunk,
            "lines": c.lines,
            "entities": len(c.entities),
            "seconds": time.perf_counter() - t0,
            "pid": os.getpid(),
        }


def _actor_count(ray: Any, opts: RayOptions) -> tuple[int, float]:
    """(actors, GPUs per actor) for this cluster."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if opts.actors is not None:
        return max(1, opts.actors), 1.0 if gpus else 0.0
    if gpus:
        return gpus, 1.0
    return max(1, int(res.get("CPU", 1)) // max(1, opts.cpus_per_actor)), 0.0


class ActorPool:
    """Actors of one class on a Ray cluster, fed items with a bounded number in flight."""

    def __init__(self, ray: Any, actors: list[Any], in_flight: int) -> None:
        self.ray = ray
        self.actors = actors
        self.window = max(1, in_flight)

    def map(
        self,
        method: str,
        items: Iterator[tuple[Any, ...]],
        on_done: Callable[[Any], None],
        backlog: Callable[[], int] | None = None,
    ) -> int:
        """Call ``actor.<method>(*item)`` for every item, the least busy actor first; hand each
        result to ``on_done`` as it finishes (not in item order). At most ``actors x
        in_flight`` items are in flight, less ``backlog()``: results the caller still holds
        (e.g. waiting for an earlier one to be written in order), so the driver's memory is
        bounded however many items there are. Returns how many items ran."""
        ray, n = self.ray, len(self.actors)
        pending: dict[Any, int] = {}  # object ref -> actor index
        load = [0] * n
        it = iter(items)
        exhausted, count = False, 0
        while True:
            held = backlog() if backlog is not None else 0
            while not exhausted and (len(pending) + held < n * self.window or not pending):
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                a = min(range(n), key=load.__getitem__)
                pending[getattr(self.actors[a], method).remote(*nxt)] = a
                load[a] += 1
            if not pending:
                return count
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                load[pending.pop(ref)] -= 1
                on_done(ray.get(ref))  # re-raises an actor's error after its retries ran out
                count += 1


@contextmanager
def actor_pool(
    actor_cls: type, actor_args: dict[str, Any], opts: RayOptions
) -> Iterator[ActorPool]:
    """A pool of ``actor_cls`` actors, each built once with ``actor_args`` and
    ``threads=opts.cpus_per_actor``, restarted and their calls retried when their process
    dies. Connects to ``opts.address`` / ``$RAY_ADDRESS``, or starts a local Ray instance for
    the pool's lifetime when Ray is not initialised yet; the actors are killed on exit."""
    ray = _ray()
    started_here = False
    if not ray.is_initialized():
        address = opts.address or os.environ.get("RAY_ADDRESS")
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:  # a local instance, just for this job
                ray.init(include_dashboard=False, log_to_driver=False)
        except ConnectionError as exc:
            raise RayUnavailableError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
        started_here = True
    actors: list[Any] = []
    try:
        n, gpus = _actor_count(ray, opts)
        remote = ray.remote(
            num_cpus=opts.cpus_per_actor,
            num_gpus=gpus,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
        )(actor_cls)
        actors = [remote.remote(**actor_args, threads=opts.cpus_per_actor) for _ in range(n)]
        logger.info(
            "ray: %d %s actor(s), %s GPU and %d CPU each",
            n,
            actor_cls.__name__,
            gpus,
            opts.cpus_per_actor,
        )
        yield ActorPool(ray, actors, opts.in_flight)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def encode_shard_ray(cfg: Any, model: Any, opts: RayOptions) -> dict[str, Any]:
    """:func:`index.build.encode_shard` on a Ray actor pool: the same chunk folders."""
    import torch
    from tqdm import tqdm

    from index.build import activate_runtime, open_shard
    from index.reader import iter_raw_chunks
    from models.device import resolve_device
    from models.onnx_encoders import default_cache_dir

    plan = open_shard(cfg, model)
    kb, out, reader, done, shard = plan.kb, plan.out, plan.reader, plan.done, plan.shard
    # exported once here, into the cache every actor then reads (actors never race to export)
    cache = str(default_cache_dir(cfg.model, cfg.onnx_cache).resolve())
    activate_runtime(
        model, plan.runtime, cfg.model, cache, torch.get_num_threads(), resolve_device("cpu")
    )
    todo = (
        (c, first, lines)
        for c, first, lines in iter_raw_chunks(kb, cfg.chunk_size)
        if reader.in_shard(c) and c not in done
    )
    bar = tqdm(
        total=sum(reader.chunk_lines(c) for c in reader.chunks if c not in done),
        desc=f"ray shard {cfg.shard_id}/{cfg.num_shards}",
        unit="ent",
        disable=not cfg.progress,
        smoothing=0.1,
    )
    args = {
        "model_path": str(cfg.model),
        "image_root": str(kb.parent.resolve()),
        "out": str(out.resolve()),
        "batch_size": cfg.batch_size,
        "workers": cfg.workers,
        "device": cfg.device,
        "drin_fields": cfg.drin_fields,
        "runtime": plan.runtime,
        "onnx_cache": cache,
    }
    recs: list[dict[str, Any]] = []

    def finished(rec: dict[str, Any]) -> None:
        recs.append(rec)
        bar.update(rec["lines"])

    t0 = time.perf_counter()
    try:
        with actor_pool(ChunkActor, args, opts) as pool:
            pool.map("encode_chunk", todo, finished)
    finally:
        bar.close()
    secs = time.perf_counter() - t0
    entities = sum(r["entities"] for r in recs)
    logger.info(
        "ray shard %d/%d: %d chunks, %d entities in %.1fs (%.1f entities/s) on %d process(es)",
        cfg.shard_id,
        cfg.num_shards,
        len(recs),
        entities,
        secs,
        entities / secs if secs else 0.0,
        len({r["pid"] for r in recs}),
    )
    return {**shard, "encoded": entities, "seconds": secs, "engine": "ray"}


__all__ = [
    "ActorPool",
    "ChunkActor",
    "RayOptions",
    "RayUnavailableError",
    "actor_pool",
    "add_ray_arguments",
    "encode_shard_ray",
    "ray_options",
]
