"""``mel-link`` (service/bulk.py): the server's answers without HTTP, bad lines, resume."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.bulk import BulkLinkError, BulkOptions, complete_lines, link_file
from service.linker import Linker
from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def settings(artifacts: tuple[Path, Path]) -> ServiceSettings:
    model, index = artifacts
    return ServiceSettings(
        model_path=str(model),
        index_path=str(index),
        device="cpu",
        use_faiss_gpu=False,
        warmup=False,
    )


@pytest.fixture(scope="module")
def linker(settings: ServiceSettings) -> Linker:
    return Linker(settings)


def _mentions(world: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (world / "mentions.jsonl").read_text().splitlines()]


def _write(path: Path, lines: list[str], world: Path) -> Path:
    """An input file whose image paths (relative to it) resolve to the world's images."""
    if not (path.parent / "images").exists():
        (path.parent / "images").symlink_to(world / "images")
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _answer(obj: dict[str, Any]) -> Any:
    """What must be the same whichever run wrote a line: all but the timings."""
    if "error" in obj:
        return obj
    res = {k: v for k, v in obj["result"].items() if k != "timings"}
    return {"line": obj["line"], "id": obj["id"], "result": res}


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        ax, by = _answer(x), _answer(y)
        if "error" in ax or "error" in by:
            assert ax == by
            continue
        cx, cy = ax["result"].pop("candidates"), by["result"].pop("candidates")
        assert ax == by
        assert [c["entity_id"] for c in cx] == [c["entity_id"] for c in cy]
        for p, q in zip(cx, cy, strict=True):
            assert p["score"] == pytest.approx(q["score"], abs=1e-4)
            assert p["retrieval_score"] == pytest.approx(q["retrieval_score"], abs=1e-4)


def test_lines_are_the_servers_answers(
    tiny_world: Path, settings: ServiceSettings, linker: Linker, tmp_path: Path
) -> None:
    ms = _mentions(tiny_world)[:12]
    inp = _write(tmp_path / "bulk-api.jsonl", [json.dumps(m) for m in ms], tiny_world)
    out = tmp_path / "links.jsonl"
    report = link_file(linker, inp, out, BulkOptions(top_k=3, batch_size=5), progress=False)
    assert (report.lines, report.written, report.errors, report.resumed_from) == (12, 12, 0, 0)
    got = _lines(out)
    assert [g["line"] for g in got] == list(range(1, 13))
    assert [g["id"] for g in got] == [m["id"] for m in ms]
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.05)
        for m, g in zip(ms, got, strict=True):
            body: dict[str, Any] = {"mention": m["mention"], "sentence": m["sentence"], "top_k": 3}
            if m["span"]:
                body["span"] = m["span"]
            if m["image"]:
                body["image"] = base64.b64encode((tiny_world / m["image"]).read_bytes()).decode()
            r = client.post("/v1/link", json=body)
            assert r.status_code == 200, r.text
            api = {"line": g["line"], "id": g["id"], "result": r.json()}
            _same([g], [api])
            assert len(g["result"]["candidates"]) == 3
            assert g["result"]["timings"]["batch_size"] == 5 if g["line"] <= 10 else 2


def test_bad_lines_get_an_error_each_and_nothing_else_is_lost(
    tiny_world: Path, linker: Linker, tmp_path: Path
) -> None:
    ms = _mentions(tiny_world)[:6]
    (tmp_path / "not-an-image.jpg").write_bytes(b"plain text, no image")
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.tiff")  # a format the API refuses
    bad = {
        2: ("{broken json", "invalid_body"),
        4: (json.dumps({"id": "x1", "sentence": "no mention field"}), "invalid_request"),
        5: (json.dumps({**ms[0], "id": "x2", "span": [3, 999]}), "bad_span"),
        7: (json.dumps({**ms[0], "id": "x3", "image": "images/missing.jpg"}), "image_not_found"),
        8: ("", "invalid_body"),
        9: (
            json.dumps({**ms[0], "id": "x4", "image": "not-an-image.jpg"}),
            "bad_image",
        ),
        10: (json.dumps({**ms[0], "id": "x5", "mention": "   "}), "empty_mention"),
        11: ("[1, 2]", "invalid_body"),
        12: (
            json.dumps({**ms[0], "id": "x6", "image": "picture.tiff"}),
            "unsupported_image_format",
        ),
    }
    lines, good = [], iter(ms)
    for n in range(1, 16):
        lines.append(bad[n][0] if n in bad else json.dumps(next(good)))
    inp = _write(tmp_path / "bulk-bad.jsonl", lines, tiny_world)
    out = tmp_path / "links.jsonl"
    report = link_file(linker, inp, out, BulkOptions(batch_size=4), progress=False)
    got = _lines(out)
    assert len(got) == 15 and report.errors == len(bad)
    assert [g["line"] for g in got] == list(range(1, 16))
    for n, (_, code) in bad.items():
        assert set(got[n - 1]) == {"line", "id", "error"}, got[n - 1]
        assert got[n - 1]["error"]["code"] == code, got[n - 1]
        assert got[n - 1]["error"]["message"]
    assert got[4]["id"] == "x2" and got[1]["id"] is None  # the id when the line has one
    # every good line is answered exactly as in a file without the bad ones
    clean = tmp_path / "clean.jsonl"
    link_file(
        linker, _write(tmp_path / "bulk-good.jsonl", [json.dumps(m) for m in ms], tiny_world), clean
    )
    answered = [g for g in got if "result" in g]
    assert [g["id"] for g in answered] == [m["id"] for m in ms]
    ref = _lines(clean)
    for g, r in zip(answered, ref, strict=True):
        r["line"] = g["line"]
    _same(answered, ref)


def test_partial_last_line_is_cut_and_finished(
    tiny_world: Path, linker: Linker, tmp_path: Path
) -> None:
    ms = _mentions(tiny_world)[:10]
    inp = _write(tmp_path / "bulk-partial.jsonl", [json.dumps(m) for m in ms], tiny_world)
    full, out = tmp_path / "full.jsonl", tmp_path / "links.jsonl"
    link_file(linker, inp, full, BulkOptions(batch_size=3), progress=False)
    link_file(linker, inp, out, BulkOptions(batch_size=3), progress=False)
    data = out.read_bytes()
    cut = data.index(b"\n", len(data) // 2) + 40  # a kill in the middle of line k + 1
    with open(out, "r+b") as f:
        f.truncate(cut)
    k = data[:cut].count(b"\n")
    report = link_file(linker, inp, out, BulkOptions(batch_size=3), progress=False)
    assert (report.resumed_from, report.written) == (k, 10 - k)
    _same(_lines(out), _lines(full))
    assert complete_lines(out) == 10
    # a finished file: a re-run writes nothing
    assert link_file(linker, inp, out, BulkOptions(batch_size=3), progress=False).written == 0


def test_an_output_made_from_other_inputs_is_refused(
    tiny_world: Path, linker: Linker, tmp_path: Path
) -> None:
    ms = _mentions(tiny_world)[:4]
    inp = _write(tmp_path / "bulk-foreign.jsonl", [json.dumps(m) for m in ms], tiny_world)
    out = tmp_path / "links.jsonl"
    link_file(linker, inp, out, BulkOptions(top_k=2), progress=False)
    with pytest.raises(BulkLinkError, match="options"):
        link_file(linker, inp, out, BulkOptions(top_k=5), progress=False)
    (tmp_path / "other.jsonl").write_text("{}\n")
    with pytest.raises(BulkLinkError, match="not written by mel-link"):
        link_file(linker, inp, tmp_path / "other.jsonl", progress=False)
    r = link_file(linker, inp, out, BulkOptions(top_k=5), restart=True, progress=False)
    assert r.written == 4 and all(len(g["result"]["candidates"]) == 5 for g in _lines(out))


def test_sigkill_mid_run_then_resume_gives_one_line_per_input(
    tiny_world: Path, artifacts: tuple[Path, Path], linker: Linker, tmp_path: Path
) -> None:
    model, index = artifacts
    ms = _mentions(tiny_world)
    N = 600  # long enough that a kill after 20 lines lands well inside the run
    lines = []
    for i in range(N):
        m = dict(ms[i % len(ms)], id=f"r{i}")
        lines.append(json.dumps(m) if i % 97 != 5 else "{not json")
    inp = _write(tmp_path / "bulk-kill.jsonl", lines, tiny_world)
    out = tmp_path / "links.jsonl"
    cmd = [sys.executable, "-m", "service.bulk", "--in", str(inp), "--out", str(out)]
    cmd += ["--model", str(model), "--index", str(index), "--device", "cpu", "--threads", "1"]
    cmd += ["--batch-size", "4", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEL_")}
    env.update(PYTHONPATH=str(ROOT), MEL_USE_FAISS_GPU="false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.stat().st_size and out.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_bytes().count(b"\n")
    assert 20 <= before < N
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"intra-op threads: 1 (set" in done.stderr  # --threads reaches the linker
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert report["resumed_from"] == before and report["resumed_from"] + report["written"] == N
    got = _lines(out)
    assert [g["line"] for g in got] == list(range(1, N + 1))
    assert [g["id"] for g in got] == [None if i % 97 == 5 else f"r{i}" for i in range(N)]
    assert sum("error" in g for g in got) == sum(1 for i in range(N) if i % 97 == 5)
    # the same answers as one uninterrupted run
    clean = tmp_path / "clean.jsonl"
    link_file(linker, inp, clean, BulkOptions(batch_size=4), progress=False)
    _same(got, _lines(clean))


def test_parallel_workers_write_the_same_file_in_input_order(
    tiny_world: Path, linker: Linker, tmp_path: Path
) -> None:
    ms = _mentions(tiny_world)
    lines = [
        json.dumps(dict(ms[i % len(ms)], id=f"w{i}")) if i % 11 != 4 else "{x" for i in range(41)
    ]
    inp = _write(tmp_path / "bulk-workers.jsonl", lines, tiny_world)
    one, three = tmp_path / "one.jsonl", tmp_path / "three.jsonl"
    link_file(linker, inp, one, BulkOptions(batch_size=2, workers=1), progress=False)
    r = link_file(linker, inp, three, BulkOptions(batch_size=2, workers=3), progress=False)
    assert (r.written, r.errors) == (41, 4)
    assert [g["line"] for g in _lines(three)] == list(range(1, 42))
    _same(_lines(three), _lines(one))
    # workers are how fast, not what: a run may resume with another count
    assert link_file(linker, inp, one, BulkOptions(workers=2), progress=False).written == 0


def test_worker_plan_splits_the_free_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """ServiceSettings.with_worker_plan: one plan for the server and mel-link."""
    import torch

    import models.threads

    monkeypatch.setattr(models.threads, "default_threads", lambda reserve=0: 4)

    def plan(**kw: object) -> tuple[int | None, int | None]:
        s = ServiceSettings(**{"device": "cpu", "intra_op_threads": None, **kw})
        p = s.with_worker_plan()
        return p.model_workers, p.intra_op_threads

    assert plan() == (4, 1)  # a single-threaded worker per free core
    assert plan(intra_op_threads=2) == (2, 2)
    assert plan(model_workers=2) == (2, 2)
    assert plan(model_workers=1, intra_op_threads=3) == (1, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plan(device="auto") == (1, None)
