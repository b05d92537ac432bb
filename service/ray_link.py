"""``mel-link --engine ray``: bulk linking on a Ray actor pool.

The driver reads ``--in`` once, cuts the lines that ``--out`` does not hold yet into blocks of
``--ray-block-lines``, and hands each block's raw lines to a pool of :class:`LinkActor`\\ s
(:func:`index.ray_engine.actor_pool`, the pool of ``mel-index build --engine ray``). Each actor
builds one :class:`~service.linker.Linker` (model, index, store, rerankers, calibration: loaded
once) and answers a block exactly as a local run answers its lines (:class:`~service.bulk.
LineParser`, :class:`~service.bulk.BulkLinker`, batches of ``--batch-size``). Actors write
nothing: the driver writes the blocks **in input order** with the local engine's writer (one
``write`` + ``fsync`` per block) and progress record, so the output file, its resume and its
refusal of foreign files are the local engine's; a run started by one engine can be resumed by
the other.

Faults: an actor whose process dies is restarted by Ray (the linker loaded again) and the block
it was answering is retried; answering is a pure function of the block, so nothing is lost or
written twice. A killed driver is resumed like a local run: re-run the same command.

Memory: at most ``actors x in_flight`` blocks are queued or running, and blocks that finish
before an earlier one wait in the driver, counted in the same window, so the driver holds a
bounded number of blocks whatever the file's size. Every actor loads its own index and store
(memory-mapped where the index allows) and needs the input's images (paths relative to the
input file) on a filesystem it can reach: on a multi-node cluster, a shared one. The driver
loads no model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from index.ray_engine import RayOptions, actor_pool
from service.bulk import (
    BulkLinker,
    BulkLinkError,
    BulkOptions,
    LineParser,
    LinksWriter,
    RunReport,
    finish_report,
    linker_facts,
    open_run,
    read_lines,
)
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

# Settings that name files: made absolute by the driver, so actors started elsewhere (another
# working directory, another node with the same shared filesystem) find the same ones.
_PATHS = ("model_path", "index_path", "drin_model_path", "fusion_model_path", "onnx_cache")


@dataclass(frozen=True)
class RayLinkOptions:
    """How a Ray run is spread: the pool (:class:`~index.ray_engine.RayOptions`) and blocks."""

    ray: RayOptions = field(default_factory=RayOptions)
    block_lines: int = 512  # lines per actor call: a dead actor costs at most one block


class LinkActor:
    """One linker, loaded once; answers whole blocks of input lines (a Ray actor's body)."""

    def __init__(
        self, settings: dict[str, Any], root: str, opts: dict[str, Any], threads: int
    ) -> None:
        from service.linker import Linker

        s = ServiceSettings(**{**settings, "intra_op_threads": max(1, threads)})
        self.linker = Linker(s)
        if s.warmup:  # the first block pays no lazy setup, as a local run's does not
            self.linker.warmup()
        self.opts = BulkOptions(**opts)
        self.parser = LineParser(Path(root), s, self.linker.model.encoder.pixels)
        self.error: str | None = None
        try:
            self.bulk: BulkLinker | None = BulkLinker(self.linker, self.opts)
        except BulkLinkError as exc:  # reported by describe(), not as a dead actor
            self.bulk, self.error = None, str(exc)

    def describe(self) -> dict[str, Any]:
        """What the driver claims the output with, or why these options cannot run."""
        return {"error": self.error, "facts": linker_facts(self.linker)}

    def link_block(self, first_line: int, raws: list[bytes]) -> dict[str, Any]:
        """The output lines of input lines ``first_line ..`` (one per input line, in order)."""
        if self.bulk is None:
            raise BulkLinkError(self.error or "unusable options")
        items = [self.parser(first_line + i, raw) for i, raw in enumerate(raws)]
        out: list[str] = []
        size = self.opts.batch_size
        for i in range(0, len(items), size):
            out += self.bulk.lines(items[i : i + size])
        return {
            "first_line": first_line,
            "lines": out,
            "errors": sum(it.mention is None for it in items),
        }


def _blocks(inp: Path, skip: int, size: int) -> Any:
    """(first line number, raw lines) of ``size`` lines each, from line ``skip + 1`` on."""
    block: list[bytes] = []
    first = skip + 1
    for lineno, raw in read_lines(inp, skip):
        if not block:
            first = lineno
        block.append(raw)
        if len(block) == size:
            yield first, block
            block = []
    if block:
        yield first, block


def actor_settings(settings: ServiceSettings) -> dict[str, Any]:
    """The driver's settings for the actors, with every path made absolute."""
    d = settings.model_dump()
    for k in _PATHS:
        if d.get(k):
            d[k] = str(Path(d[k]).resolve())
    return d


def link_file_ray(
    settings: ServiceSettings,
    inp: str,
    out: str,
    opts: BulkOptions,
    ray_opts: RayLinkOptions | None = None,
    restart: bool = False,
    progress: bool = True,
) -> RunReport:
    """:func:`service.bulk.link_file` on a Ray actor pool: the same output file."""
    ray_opts = ray_opts or RayLinkOptions()
    if ray_opts.block_lines < 1:
        raise BulkLinkError("--ray-block-lines must be >= 1")
    if not Path(inp).is_file():
        raise BulkLinkError(f"no input file at {inp}")
    root = str(Path(inp).resolve().parent)
    args = {"settings": actor_settings(settings), "root": root, "opts": asdict(opts)}
    with actor_pool(LinkActor, args, ray_opts.ray) as pool:
        try:
            info = pool.ray.get(pool.actors[0].describe.remote())
        except Exception as exc:  # the actor's constructor failed: a model or index unusable
            raise BulkLinkError(f"the link actors could not start: {exc}") from exc
        if info["error"]:
            raise BulkLinkError(info["error"])
        run = open_run(inp, out, opts, info["facts"], restart)
        writer = LinksWriter(run.out)
        bar = tqdm(
            total=run.total, initial=run.done, unit="mention", disable=not progress, smoothing=0.05
        )
        waiting: dict[int, dict[str, Any]] = {}  # finished blocks after a missing earlier one
        state = {"next": run.done + 1, "written": 0, "errors": 0}

        def finished(block: dict[str, Any]) -> None:
            waiting[block["first_line"]] = block
            while state["next"] in waiting:  # write every block whose turn has come
                b = waiting.pop(state["next"])
                writer.write(b["lines"])
                n = len(b["lines"])
                state["next"] += n
                state["written"] += n
                state["errors"] += b["errors"]
                bar.update(n)

        t0 = time.perf_counter()
        try:
            pool.map(
                "link_block",
                _blocks(run.inp, run.done, ray_opts.block_lines),
                finished,
                backlog=lambda: len(waiting),
            )
        finally:
            bar.close()
            writer.close()
        if waiting:  # cannot happen unless an actor answered the wrong block
            raise BulkLinkError(f"blocks never written: {sorted(waiting)}")
        return finish_report(run, state["written"], state["errors"], time.perf_counter() - t0)


__all__ = ["LinkActor", "RayLinkOptions", "actor_settings", "link_file_ray"]
