"""mel-demo-train's stages (models/demo_jobs.py): a model appears in its folder only when its
training finished, with status.json saying where the job is (what /readyz shows)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from models.demo_jobs import _stage
from service.pipeline import _complete, pending_status


def _writes(path: Path) -> list[str]:
    code = f"import pathlib; p = pathlib.Path({str(path)!r}); p.mkdir(parents=True); "
    code += "(p / 'config.json').write_text('{}')"
    return [sys.executable, "-c", code]


def test_a_stage_moves_its_model_into_place_only_when_done(tmp_path: Path) -> None:
    out, log = tmp_path / "drin", tmp_path / "log"
    target = out / "best"
    steps = [
        ("train", _writes(out / ".training" / "best")),
        ("evaluate", [sys.executable, "-c", "print('evaluated')"]),
    ]
    assert _stage(out, "best", steps, log)
    assert _complete(str(target)) and not (out / ".training").exists()
    assert pending_status(str(target))["state"] == "done"
    assert "evaluated" in log.read_text()
    assert _stage(out, "best", [("train", [sys.executable, "-c", "raise SystemExit(3)"])], log)


def test_a_failed_stage_leaves_no_model_and_says_why(tmp_path: Path) -> None:
    out, log = tmp_path / "fusion", tmp_path / "log"
    steps = [
        ("tables", _writes(out / ".training" / "model")),
        ("train", [sys.executable, "-c", "raise SystemExit(3)"]),
    ]
    assert not _stage(out, "model", steps, log)
    assert not _complete(str(out / "model"))
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == "train" and "exit 3" in status["error"]
    assert pending_status(str(out / "model"))["state"] == "failed"
