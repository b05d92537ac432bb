"""``mel-demo-train``: the demo's slower learned stages, run in the background while it serves.

``make demo`` serves MIMIC as soon as it is trained and starts this job beside the server:
MIMIC's test evaluation, then DRIN (trained, evaluated), then the fusion ranker over the
server's own candidate lists (``mel-candidates`` with DRIN's scores, ``mel-train-fusion``).
Each model is trained in a hidden ``.training`` folder and moved into place only when done
(a rename), so the server, which watches the configured folders (``MEL_RELOAD_POLL_S``),
never loads a half-trained model; it hot-swaps each one in as it appears. Progress is written to
``<out>/status.json`` (what ``/readyz`` shows under ``pending``). Finished stages are skipped on
a re-run; one job at a time (``<artifacts>/demo-train.pid``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _status(folder: Path, **fields: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "status.json.tmp"
    tmp.write_text(json.dumps({**fields, "pid": os.getpid(), "at": time.time()}))
    tmp.replace(folder / "status.json")


def _run(cmd: list[str], log: Path) -> None:
    logger.info("running %s", " ".join(cmd))
    with open(log, "ab") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def _bin(name: str) -> str:
    """A console script of this environment (beside the interpreter)."""
    return str(Path(sys.executable).with_name(name))


def _stage(out: Path, final: str, steps: list[tuple[str, list[str]]], log: Path) -> bool:
    """Run ``steps`` into ``out/.training`` and move ``.training/<final>`` to ``out/<final>``
    when all succeeded; False (status "failed") if one failed."""
    if (out / final / "config.json").is_file():
        return True
    work = out / ".training"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.time()
    for i, (what, cmd) in enumerate(steps, start=1):
        _status(out, state="training", step=what, steps=f"{i}/{len(steps)}", started=t0)
        try:
            _run(cmd, log)
        except subprocess.CalledProcessError as exc:
            _status(out, state="failed", step=what, error=f"exit {exc.returncode}; see {log}")
            return False
    (work / final).rename(out / final)  # atomic: the server sees a complete folder or none
    shutil.rmtree(work / "tables", ignore_errors=True)  # fusion's training lists: not kept
    for extra in work.iterdir():  # metrics and reports next to the model
        extra.replace(out / extra.name)
    work.rmdir()
    _status(out, state="done", seconds=round(time.time() - t0, 1))
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mel-demo-train", description=__doc__)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--model", required=True, type=Path, help="the served MIMIC checkpoint")
    p.add_argument("--index", required=True, type=Path)
    p.add_argument("--drin-out", required=True, type=Path)
    p.add_argument("--fusion-out", required=True, type=Path)
    p.add_argument("--cache-dir", default="artifacts/cache")
    p.add_argument("--drin-args", default="", help="extra mel-train-drin flags")
    p.add_argument("--log", type=Path, default=Path("artifacts/demo-train.log"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    pid_file = a.log.with_name("demo-train.pid")
    if pid_file.is_file():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(pid_file.read_text()), 0)
            logger.info("another mel-demo-train (pid %s) is running", pid_file.read_text())
            return 0
    pid_file.write_text(str(os.getpid()))
    try:
        return _main(a)
    finally:
        pid_file.unlink(missing_ok=True)


def _main(a: argparse.Namespace) -> int:
    data, model, cache = str(a.data), str(a.model), a.cache_dir
    metrics = a.model.parent / "test-metrics.json"
    if not metrics.is_file():
        _run(
            [_bin("mel-eval"), "--model", model, "--data", data, "--split", "test",
             "--cache-dir", cache, "--out", str(metrics)],
            a.log,
        )  # fmt: skip
    work = a.drin_out / ".training"
    drin_ok = _stage(
        a.drin_out,
        "best",
        [
            (
                "train",
                [_bin("mel-train-drin"), "--data", data, "--model", model, "--out", str(work),
                 "--cache-dir", cache, "--no-progress", *a.drin_args.split()],
            ),
            (
                "evaluate",
                [_bin("mel-eval-drin"), "--data", data, "--model", model,
                 "--drin", str(work / "best"), "--split", "test", "--candidates", "100",
                 "--cache-dir", cache, "--out", str(work / "test-metrics.json")],
            ),
        ],
        a.log,
    )  # fmt: skip
    drin = [str(a.drin_out / "best")] if drin_ok else []
    work = a.fusion_out / ".training"
    fusion_ok = _stage(
        a.fusion_out,
        "model",
        [
            (
                "candidate tables",
                [_bin("mel-candidates"), "--data", data, "--model", model,
                 "--index", str(a.index), "--out", str(work / "tables"),
                 *(["--drin", *drin] if drin else [])],
            ),
            (
                "train",
                [_bin("mel-train-fusion"), "--tables", str(work / "tables"),
                 "--out", str(work / "model"), "--report", str(work / "report.json"),
                 *([] if drin else ["--no-drin"])],
            ),
        ],
        a.log,
    )  # fmt: skip
    return 0 if drin_ok and fusion_ok else 1


if __name__ == "__main__":
    sys.exit(main())
