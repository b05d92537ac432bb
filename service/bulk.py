"""``mel-link``: bulk linking, a mentions JSONL file -> a links JSONL file, without HTTP.

    mel-link --model artifacts/demo-model/best --index artifacts/demo-index \\
             --in artifacts/demo-world/mentions.jsonl --out artifacts/links.jsonl \\
             [--reranker mimic] [--top-k 10] [--candidates-k 100] [--batch-size 32]

Input: the canonical mention format of a dataset's ``mentions.jsonl`` (``models/data/schema.py``:
``{"id", "mention", "sentence", "span"?, "image"?, "entity_id"?}``; ``image`` is a path relative
to the input file's folder; ``entity_id``, the gold, is not needed and is ignored).

Output: exactly one line per input line, in input order::

    {"line": 7, "id": "m17", "result": {...}}              # the JSON /v1/link answers
    {"line": 8, "id": "m18", "error": {"code", "message"}}  # the API's error codes

``result`` is built by the server's own :func:`service.pipeline.to_response` from the same
:class:`~service.linker.Linker` (model, index, rerankers, calibration, NIL rule); only
``timings`` differ (they describe this run's batch). A bad line (broken JSON, missing fields,
a span outside the sentence, a missing or undecodable image, a blank line) gets an ``error``
line with the code the API would answer, and nothing else is lost.

**Resumable.** Every batch's lines are written with one ``write`` and ``fsync``'d before the
next batch starts, and output line i always answers input line i. A re-run with the same
arguments counts the complete lines already in ``--out``, cuts a partial last line a kill left
behind, skips that many input lines and goes on: no line is missing or written twice.
``<out>.progress.json`` records what the file was made from (input size and mtime, model and
index versions, options); a re-run that does not match is refused (``--restart`` starts over).

**Streaming, bounded memory.** Input is read line by line; a reader thread parses and decodes
the images of the next ``--prefetch`` batches while the model works on the current ones, so
memory is bounded by ``(prefetch + workers + 1) x batch-size`` mentions whatever the file's size.

**Workers.** ``--workers`` batches are linked at once on their own threads over one shared
linker (its ops release the GIL) and written in input order. On CPU the default is one
single-threaded worker per free core (:func:`models.threads.plan_workers`: measured faster than one worker
with every core).

**On a cluster.** ``--engine ray`` (service/ray_link.py) answers blocks of ``--ray-block-lines``
lines on a pool of Ray actors, one linker each, and writes them here in input order: the same
file, resumable by either engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import ValidationError
from tqdm import tqdm

from index.ray_engine import add_ray_arguments
from service.errors import ApiError, describe, validation_code
from service.images import ImageLimits, open_image
from service.linker import Linker
from service.pipeline import to_response
from service.primitives import (
    BatchTimes,
    EncodedMentions,
    LinkedMention,
    LinkParams,
    MentionBatch,
    MentionInput,
)
from service.schemas import LinkRequest, Timings
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

PROGRESS_SUFFIX = ".progress.json"
# Fields of a canonical mention line that are not part of a link request: the mention's id
# (echoed back), its image path (read here, sent to the model decoded) and the gold entity.
_NOT_REQUEST = ("id", "image", "entity_id")
EXIT_USER_ERROR = 1


class BulkLinkError(RuntimeError):
    """A bulk run that cannot start (unusable paths, an output made from other inputs)."""


@dataclass(frozen=True)
class BulkOptions:
    """What every mention of a run is linked with (the API's per-request fields)."""

    top_k: int = 10
    candidates_k: int = 100
    reranker: str | None = None  # None: the linker's default (fusion when loaded, else mimic)
    explain: bool = False
    batch_size: int = 32  # mentions encoded and reranked together
    prefetch: int = 2  # batches parsed + decoded ahead of the model (bounds memory)
    workers: int = 1  # batches linked at once, each on its own thread (one shared linker)


@dataclass(frozen=True)
class LineItem:
    """One input line: a mention ready for the model, or the error object it is answered."""

    line: int  # 1-based line number in the input file
    id: str | None
    mention: MentionInput | None = None
    error: dict[str, str] | None = None


@dataclass(frozen=True)
class RunReport:
    """What one invocation did: lines in the file, resumed from, written now, errors among them."""

    lines: int
    resumed_from: int
    written: int
    errors: int
    seconds: float

    @property
    def mentions_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------------- parsing
class LineParser:
    """Input line -> :class:`LineItem`, with the API's validation and image limits."""

    def __init__(
        self,
        root: Path,
        settings: ServiceSettings,
        pixels: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        """``pixels``: the encoder's transform (``MimicEncoder.pixels``), run here on the
        reader thread so the model's thread gets each image resized already."""
        self.root = root
        self.settings = settings
        self.pixels = pixels
        self.limits = ImageLimits(
            settings.max_image_bytes, settings.max_image_pixels, tuple(settings.image_formats)
        )

    def __call__(self, lineno: int, raw: bytes) -> LineItem:
        mid: str | None = None
        try:
            if not raw.strip():
                raise ApiError(422, "invalid_body", "blank line")
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(422, "invalid_body", f"not a JSON object: {exc}") from exc
            if not isinstance(obj, dict):
                raise ApiError(422, "invalid_body", "a line must be a JSON object")
            if isinstance(obj.get("id"), str | int) and not isinstance(obj.get("id"), bool):
                mid = str(obj["id"])
            return LineItem(lineno, mid, mention=self._mention(obj))
        except ApiError as exc:
            return LineItem(lineno, mid, error={"code": exc.code, "message": exc.message})

    def _mention(self, obj: dict[str, Any]) -> MentionInput:
        try:
            req = LinkRequest.model_validate(
                {k: v for k, v in obj.items() if k not in _NOT_REQUEST}
            )
        except ValidationError as exc:
            raise ApiError(422, validation_code(exc.errors()), describe(exc.errors())) from exc
        s = self.settings  # the server's settings-dependent bounds, with its codes
        if len(req.mention) > s.max_mention_chars:
            raise ApiError(
                422, "mention_too_long", f"mention over {s.max_mention_chars} characters"
            )
        if len(req.sentence) > s.max_sentence_chars:
            raise ApiError(
                422, "sentence_too_long", f"sentence over {s.max_sentence_chars} characters"
            )
        image, sha = None, None
        path = obj.get("image")
        if path is not None:
            if not isinstance(path, str) or not path:
                raise ApiError(422, "bad_image_path", "image must be a path relative to the file")
            try:
                raw = (self.root / path).read_bytes()
            except OSError as exc:
                raise ApiError(
                    422, "image_not_found", f"cannot read image {path}: {exc.strerror}"
                ) from exc
            image, sha = open_image(raw, self.limits)
        span = (req.span[0], req.span[1]) if req.span else None
        pixels = self.pixels(image) if image is not None and self.pixels is not None else None
        return MentionInput(req.mention, req.sentence, image, sha, span, pixels)


def read_lines(path: Path, skip: int) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its newline) from line ``skip + 1`` on."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno > skip:
                yield lineno, raw.rstrip(b"\r\n")


def count_lines(path: Path) -> int:
    """Lines in a file; a last line without a newline counts too."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


# ----------------------------------------------------------------------------------- output
def complete_lines(path: Path) -> int:
    """Complete lines of an output file; a partial last line (a kill mid-write) is cut off."""
    if not path.exists():
        return 0
    n, end = 0, 0
    with open(path, "rb") as f:
        pos = 0
        for block in iter(lambda: f.read(1 << 22), b""):
            k = block.count(b"\n")
            if k:
                n += k
                end = pos + block.rfind(b"\n") + 1
            pos += len(block)
    if end != path.stat().st_size:
        logger.warning(
            "%s: cutting a partial last line (%d bytes)", path, path.stat().st_size - end
        )
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    return n


class LinksWriter:
    """Appends whole batches of lines: one ``write``, then ``fsync``, so a kill leaves at most
    one partial last line (cut off on resume), never a reordered or half-batched file."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, lines: Sequence[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def linker_facts(linker: Linker) -> dict[str, Any]:
    """What of a loaded linker an output file depends on (see :func:`_identity`)."""
    return {
        "cache_version": linker.cache_version,
        "nil_threshold": linker.nil_threshold,
        "default_reranker": linker.default_reranker,
    }


def _identity(inp: Path, opts: BulkOptions, facts: dict[str, Any]) -> dict[str, Any]:
    """What an output file depends on; a resumed run must match it (whichever engine ran)."""
    st = inp.stat()
    o = asdict(opts)
    for k in ("batch_size", "prefetch", "workers"):  # how fast, not what: may change
        o.pop(k)
    return {
        "input": str(inp.resolve()),
        "input_bytes": st.st_size,
        "input_mtime_ns": st.st_mtime_ns,
        "cache_version": facts["cache_version"],
        "nil_threshold": facts["nil_threshold"],
        "options": {**o, "reranker": opts.reranker or facts["default_reranker"]},
    }


def _claim(out: Path, identity: dict[str, Any], restart: bool) -> int:
    """Lines already done in ``out`` (0 for a new or restarted file); refuses a foreign file."""
    prog = out.with_name(out.name + PROGRESS_SUFFIX)
    if restart:
        out.unlink(missing_ok=True)
        prog.unlink(missing_ok=True)
    if out.exists():
        if not prog.is_file():
            raise BulkLinkError(
                f"{out} exists but was not written by mel-link (no {prog.name}); "
                "pass --restart to overwrite it"
            )
        old = json.loads(prog.read_text())
        if old != identity:
            diff = sorted(k for k in identity if old.get(k) != identity[k])
            raise BulkLinkError(
                f"{out} was made from other inputs ({', '.join(diff)} differ); "
                "pass --restart to start over, or use another --out"
            )
    tmp = prog.with_name(prog.name + ".tmp")
    tmp.write_text(json.dumps(identity, indent=1))
    tmp.replace(prog)
    return complete_lines(out)


# ----------------------------------------------------------------------------------- linking
class BulkLinker:
    """Links batches of parsed lines with a :class:`Linker` into output lines."""

    def __init__(self, linker: Linker, opts: BulkOptions) -> None:
        reranker = opts.reranker or linker.default_reranker
        if reranker not in linker.rerankers:
            raise BulkLinkError(
                f"reranker {reranker!r} is not available with these models "
                f"(available: {', '.join(linker.rerankers)})"
            )
        s = linker.settings
        if not 1 <= opts.top_k <= s.top_k_max:
            raise BulkLinkError(f"--top-k must be in [1, {s.top_k_max}]")
        if not 1 <= opts.candidates_k <= s.candidates_k_max:
            raise BulkLinkError(f"--candidates-k must be in [1, {s.candidates_k_max}]")
        self.linker = linker
        # one linking thread leaves the other planned cores to its image towers; with several,
        # every core is kept busy and each batch encodes its towers in turn (models/towers.py)
        self.towers_beside = opts.workers <= 1
        # the same rule as the server: never rerank fewer candidates than are returned
        self.params = LinkParams(
            top_k=opts.top_k,
            candidates_k=max(opts.candidates_k, opts.top_k),
            reranker=reranker,
            explain=opts.explain,
        )

    def lines(self, items: Sequence[LineItem]) -> list[str]:
        """One output line per item, in order."""
        ok = [it for it in items if it.mention is not None]
        answers: dict[int, str] = {}
        if ok:
            inputs = tuple(it.mention for it in ok if it.mention is not None)
            t0 = time.perf_counter()
            encoded: EncodedMentions = self.linker.encode(inputs, beside=self.towers_beside)
            t1 = time.perf_counter()
            results, lt = self.linker.link(
                MentionBatch(inputs, encoded), [self.params] * len(inputs)
            )
            times = BatchTimes(
                encode_ms=1000 * (t1 - t0),
                retrieve_ms=1000 * lt.retrieve,
                rerank_ms=1000 * lt.rerank,
                batch_size=len(inputs),
                finished=time.perf_counter(),
            )
            for it, res in zip(ok, results, strict=True):
                out = to_response(self.linker, LinkedMention(res, times, 0.0))
                out.timings = Timings(  # this batch's model work, shared by its mentions
                    encode_ms=times.encode_ms,
                    retrieve_ms=times.retrieve_ms,
                    rerank_ms=times.rerank_ms,
                    total_ms=times.work_ms,
                    batch_size=len(inputs),
                )
                answers[it.line] = json.dumps(
                    {"line": it.line, "id": it.id, "result": out.model_dump(mode="json")},
                    ensure_ascii=False,
                )
        return [
            answers[it.line]
            if it.mention is not None
            else json.dumps({"line": it.line, "id": it.id, "error": it.error}, ensure_ascii=False)
            for it in items
        ]


_DONE = object()


def _batches(
    inp: Path, skip: int, parser: LineParser, size: int, prefetch: int
) -> Iterator[list[LineItem]]:
    """Batches of parsed lines, produced by a reader thread ``prefetch`` batches ahead
    (``prefetch`` 0: parsed in the caller's thread, between the model's batches)."""
    if prefetch <= 0:
        batch: list[LineItem] = []
        for lineno, raw in read_lines(inp, skip):
            batch.append(parser(lineno, raw))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(obj: Any) -> bool:
        """Hand ``obj`` to the consumer; False once it has stopped listening."""
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            batch: list[LineItem] = []
            for lineno, raw in read_lines(inp, skip):
                batch.append(parser(lineno, raw))
                if len(batch) == size:
                    if not put(batch):
                        return
                    batch = []
            if not batch or put(batch):
                put(_DONE)
        except BaseException as exc:  # surfaced in the consumer, never swallowed
            put(exc)

    t = threading.Thread(target=produce, name="mel-link-reader", daemon=True)
    t.start()
    try:
        while True:
            got = q.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()


@dataclass(frozen=True)
class _Run:
    """An opened run: the paths, the input's line count and the lines already done."""

    inp: Path
    out: Path
    total: int
    done: int


def open_run(
    inp: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opts: BulkOptions,
    facts: dict[str, Any],
    restart: bool,
) -> _Run:
    """Check the paths, claim ``out`` (refusing one made from other inputs) and count what an
    earlier run finished."""
    inp, out = Path(inp), Path(out)
    if not inp.is_file():
        raise BulkLinkError(f"no input file at {inp}")
    if out.resolve() == inp.resolve():
        raise BulkLinkError("--out must not be the input file")
    out.parent.mkdir(parents=True, exist_ok=True)
    total = count_lines(inp)
    done = _claim(out, _identity(inp, opts, facts), restart)
    if done > total:
        raise BulkLinkError(f"{out} has {done} lines but {inp} only {total}; pass --restart")
    if done:
        logger.info("resuming %s after %d of %d lines", out, done, total)
    return _Run(inp, out, total, done)


def finish_report(run: _Run, written: int, errors: int, secs: float) -> RunReport:
    report = RunReport(run.total, run.done, written, errors, secs)
    logger.info(
        "%s: %d lines written (%d errors) in %.1fs, %.1f mentions/s; %d of %d done",
        run.out,
        written,
        errors,
        secs,
        report.mentions_per_s,
        run.done + written,
        run.total,
    )
    return report


def link_file(
    linker: Linker,
    inp: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opts: BulkOptions | None = None,
    settings: ServiceSettings | None = None,
    restart: bool = False,
    progress: bool = True,
) -> RunReport:
    """Link every line of ``inp`` into ``out`` (resuming a killed run; see the module doc)."""
    opts = opts or BulkOptions()
    if not Path(inp).is_file():
        raise BulkLinkError(f"no input file at {inp}")
    bulk = BulkLinker(linker, opts)
    run = open_run(inp, out, opts, linker_facts(linker), restart)
    parser = LineParser(run.inp.parent, settings or linker.settings, linker.model.encoder.pixels)
    writer = LinksWriter(run.out)
    bar = tqdm(
        total=run.total, initial=run.done, unit="mention", disable=not progress, smoothing=0.05
    )
    written = errors = 0

    def write(batch: list[LineItem], lines: list[str]) -> None:
        nonlocal written, errors
        writer.write(lines)
        written += len(batch)
        errors += sum(it.mention is None for it in batch)
        bar.update(len(batch))

    t0 = time.perf_counter()
    batches = _batches(run.inp, run.done, parser, opts.batch_size, opts.prefetch)
    try:
        if opts.workers <= 1:
            for batch in batches:
                write(batch, bulk.lines(batch))
        else:
            _link_parallel(bulk, batches, opts.workers, write)
    finally:
        bar.close()
        writer.close()
    return finish_report(run, written, errors, time.perf_counter() - t0)


def _link_parallel(
    bulk: BulkLinker,
    batches: Iterator[list[LineItem]],
    workers: int,
    write: Callable[[list[LineItem], list[str]], None],
) -> None:
    """``workers`` batches linked at once on their own threads (the linker's ops release the
    GIL), written strictly in input order; at most ``workers + 1`` batches are in the air."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mel-link") as pool:
        pending: deque[tuple[list[LineItem], Future[list[str]]]] = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(bulk.lines, batch)))
                while len(pending) > workers:
                    done, fut = pending.popleft()
                    write(done, fut.result())
            while pending:
                done, fut = pending.popleft()
                write(done, fut.result())
        finally:  # an error: nothing after the failed batch is written; the rest is dropped
            for _, fut in pending:
                fut.cancel()


# ----------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mel-link", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--in", dest="inp", required=True, help="mentions JSONL (canonical format)")
    p.add_argument("--out", required=True, help="links JSONL (one line per input line)")
    p.add_argument("--model", help="checkpoint folder (MEL_MODEL_PATH)")
    p.add_argument("--index", help="index folder (MEL_INDEX_PATH)")
    p.add_argument("--drin", help="DRIN checkpoint folder (MEL_DRIN_MODEL_PATH)")
    p.add_argument("--fusion", help="fusion model folder (MEL_FUSION_MODEL_PATH)")
    p.add_argument(
        "--reranker", choices=["fusion", "mimic", "drin", "none"], help="default: the server's"
    )
    p.add_argument("--top-k", type=int, default=None, help="candidates returned (MEL default)")
    p.add_argument("--candidates-k", type=int, default=None, help="candidates reranked")
    p.add_argument("--batch-size", type=int, default=BulkOptions.batch_size)
    p.add_argument("--prefetch", type=int, default=BulkOptions.prefetch, help="batches ahead")
    p.add_argument("--explain", action="store_true")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="MEL_DEVICE")
    p.add_argument(
        "--workers",
        type=int,
        help="batches linked at once, each on its own thread, one shared linker "
        "(MEL_MODEL_WORKERS; default: on CPU the cores free at start divided by --threads, "
        "on a GPU 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch and onnxruntime intra-op threads of each worker (MEL_INTRA_OP_THREADS; "
        "default: on CPU the free cores divided by --workers, else 1 per worker; on a GPU "
        "the free cores)",
    )
    p.add_argument("--restart", action="store_true", help="discard --out and start over")
    p.add_argument("--no-progress", action="store_true")
    r = p.add_argument_group("engine (service/ray_link.py)")
    r.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: a Ray actor pool (pip install '.[ray]')",
    )
    add_ray_arguments(r)
    r.add_argument("--ray-block-lines", type=int, default=512, help="input lines per actor call")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("model_path", a.model),
            ("index_path", a.index),
            ("drin_model_path", a.drin),
            ("fusion_model_path", a.fusion),
            ("device", a.device),
            ("intra_op_threads", a.threads),
            ("model_workers", a.workers),
        )
        if v
    }
    if a.workers is not None and a.workers < 1:
        _parser().error("--workers must be >= 1")
    settings = ServiceSettings(**overrides).with_worker_plan()  # the server's own plan
    workers, threads = settings.model_workers or 1, settings.intra_op_threads
    if a.engine == "local":
        logger.info("mel-link: %d worker(s) x %s intra-op thread(s)", workers, threads or "default")
    opts = BulkOptions(
        top_k=a.top_k or settings.top_k_default,
        candidates_k=a.candidates_k or settings.candidates_k_default,
        reranker=a.reranker,
        explain=a.explain,
        batch_size=a.batch_size,
        prefetch=a.prefetch,
        workers=workers,
    )
    if opts.batch_size < 1:
        _parser().error("--batch-size must be >= 1")
    try:
        if not Path(a.inp).is_file():
            raise BulkLinkError(f"no input file at {a.inp}")
        if a.engine == "ray":
            report = _run_ray(a, settings, opts)
        else:
            linker = Linker(settings)
            try:
                if settings.warmup:  # first batches pay no lazy setup, as the server's do not
                    linker.warmup()
                report = link_file(
                    linker,
                    a.inp,
                    a.out,
                    opts,
                    settings,
                    restart=a.restart,
                    progress=not a.no_progress,
                )
            finally:
                linker.close()
    except BulkLinkError as exc:
        print(f"mel-link: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps({**asdict(report), "mentions_per_s": round(report.mentions_per_s, 2)}))
    return 0


def _run_ray(a: argparse.Namespace, settings: ServiceSettings, opts: BulkOptions) -> RunReport:
    """``--engine ray``: imports Ray (and service/ray_link.py) only when asked for."""
    from index.ray_engine import RayUnavailableError, ray_options
    from service.ray_link import RayLinkOptions, link_file_ray  # Ray itself: only when run

    try:
        ray_opts = RayLinkOptions(ray_options(a), block_lines=a.ray_block_lines)
    except ValueError as exc:
        raise BulkLinkError(str(exc)) from exc
    try:
        return link_file_ray(
            settings, a.inp, a.out, opts, ray_opts, restart=a.restart, progress=not a.no_progress
        )
    except RayUnavailableError as exc:
        raise BulkLinkError(str(exc)) from exc


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "BulkLinkError",
    "BulkLinker",
    "BulkOptions",
    "LineItem",
    "LineParser",
    "LinksWriter",
    "RunReport",
    "complete_lines",
    "count_lines",
    "link_file",
    "linker_facts",
    "main",
    "open_run",
]
