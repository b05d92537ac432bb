"""Live KB updates (index/live.py, service/kb.py): segments, tombstones, crash safety,
compaction, and the admin routes over real HTTP; hot swaps under load; rerankers picked up
once trained."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from index.live import LIVE_DIR, LiveSearcher, compact, segments
from index.search import IndexSearcher
from models.data.schema import Entity
from models.drin_features import DrinReranker, DrinRerankerConfig
from models.model import LinkingModel
from service.kb import EntitiesNotFound, LiveKb, NewEntity
from tests.test_service import _b64, _png, _settings, serve, start_cli

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"X-Admin-Key": "adm"}


@pytest.fixture
def folder(artifacts: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the tiny index (tests write to it)."""
    dst = tmp_path / "index"
    shutil.copytree(artifacts[1], dst)
    return dst


@pytest.fixture(scope="module")
def model(artifacts: tuple[Path, Path]) -> LinkingModel:
    return LinkingModel.from_pretrained(artifacts[0]).eval()


def _query(model: LinkingModel, mention: str, sentence: str) -> np.ndarray:
    with torch.inference_mode():
        enc = model.encoder
        feats = enc.project(
            enc.text_features([f"{mention} [SEP] {sentence}"]), enc.image_features([None])
        )
        return model.matcher.retrieval_queries(feats).numpy()


def _ids(s: LiveSearcher, rows: np.ndarray) -> list[str]:
    return [s.entity(int(r))["id"] for r in rows if r >= 0]


def test_add_replace_delete_then_reopen(model: LinkingModel, folder: Path) -> None:
    s = LiveSearcher(folder, model.fingerprint())
    kb = LiveKb(model, s, 5.0)
    n0 = len(s)
    new = Entity("Z1", "Quentin Zephyrine", "Occupation: astronaut.")
    res = kb.upsert([NewEntity(new)])
    assert res.added == ("Z1",) and res.entities == n0 + 1 and ".1-" in s.version
    q = _query(model, "Quentin Zephyrine", "Quentin Zephyrine flew.")
    assert "Z1" in _ids(s, s.search(q, 5).rows[0])
    # the lexical channel finds it by name, scored on the base's idf
    hits = s.lexical(["Quentin Zephyrin"], 3)
    assert _ids(s, hits.rows[0])[0] == "Z1" and hits.scores[0, 0] > 0.5
    old_row = s.row_of("E00")
    res = kb.upsert([NewEntity(Entity("E00", "Jo Ames", "Occupation: sculptor."))])
    assert res.replaced == ("E00",) and res.entities == n0 + 1
    assert s.row_of("E00") != old_row and s.entity(s.row_of("E00"))["attributes"].endswith(
        "sculptor."
    )
    kb.delete(["E01"])
    with pytest.raises(EntitiesNotFound):
        kb.delete(["E01"])  # already gone: nothing is written
    assert len(segments(folder)) == 3
    every = s.search(q, 100).rows[0]
    assert old_row not in every and s.row_of("E01") is None
    assert "E01" not in _ids(s, every) and _ids(s, every).count("E00") == 1
    assert "E01" not in _ids(s, s.lexical(["Jo Ames"], 100).rows[0])
    fields = s.records(np.array([[s.row_of("Z1"), 0]]))
    assert fields.text_cls.shape[:2] == (1, 2)
    # live rows are float16 per entity, not coded as the base: the kernel gets float32 then
    assert s.stored_records(np.array([[s.row_of("Z1"), 0]])) is None
    assert s.stored_records(np.array([[0, 1]])) is not None
    # a restart applies the same segments: the same answers
    again = LiveSearcher(folder, model.fingerprint())
    assert len(again) == len(s) == n0 and again.version == s.version
    assert _ids(again, again.search(q, 100).rows[0]) == _ids(s, every)
    # a plain reader of the base ignores the live part; the base files were never touched
    assert len(IndexSearcher(folder, model.fingerprint())) == n0


def test_half_written_segment_is_ignored_and_cleaned(model: LinkingModel, folder: Path) -> None:
    s = LiveSearcher(folder, model.fingerprint())
    LiveKb(model, s, 5.0).upsert([NewEntity(Entity("Z2", "Ursula Vance", ""))])
    # what a writer killed before its commit leaves: a .tmp folder, complete or not
    tmp = folder / LIVE_DIR / ".s00000002.999999.tmp"
    shutil.copytree(folder / LIVE_DIR / "s00000001", tmp)
    (tmp / "meta.json").unlink()
    reopened = LiveSearcher(folder, model.fingerprint())
    assert reopened.generation == 1 and reopened.row_of("Z2") is not None
    LiveKb(model, reopened, 5.0).upsert([NewEntity(Entity("Z3", "Vera Ulm", ""))])
    assert not tmp.exists() and [q for q, _ in segments(folder)] == [1, 2]


_WRITER = """
import sys
from index.live import LiveSearcher
from models.data.schema import Entity
from models.model import LinkingModel
from service.kb import LiveKb, NewEntity
model = LinkingModel.from_pretrained(sys.argv[1]).eval()
s = LiveSearcher(sys.argv[2], model.fingerprint())
kb = LiveKb(model, s, 5.0)
for i in range(10_000):
    ents = [NewEntity(Entity(f"K{i}-{j}", f"Kappa {i} {j}", "x" * 50)) for j in range(3)]
    kb.upsert(ents)
    # one write per line: print's pieces are separate writes when PYTHONUNBUFFERED is set, and
    # a kill between them left a line "acked" without its number
    sys.stdout.write(f"acked {i}\n")
    sys.stdout.flush()
"""


def test_killed_writer_loses_nothing_acknowledged(
    artifacts: tuple[Path, Path], model: LinkingModel, folder: Path
) -> None:
    acked: set[str] = set()
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(artifacts[0]), str(folder)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        # let it commit a few updates, then kill it mid-stream
        for seen, line in enumerate(proc.stdout, start=1):
            i = int(line.split()[1])
            acked.update(f"K{i}-{j}" for j in range(3))
            if seen == 3 + 2 * round_:
                time.sleep(0.01 * round_)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(30)
        rest = proc.stdout.read()
        # acked between our last read and the kill (a line cut by the kill, without its
        # newline, is not counted: counting fewer acknowledgements only weakens the check)
        for line in rest.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue
            i = int(line.split()[1])
            acked.update(f"K{i}-{j}" for j in range(3))
        s = LiveSearcher(folder, model.fingerprint())
        present = {s.entity(r)["id"] for r, live in s.alive_rows() if live}
        assert acked <= present
        # whole updates only: each one added its three entities or none of them
        groups = {e.rsplit("-", 1)[0] for e in present}
        assert all({f"{g}-{j}" for j in range(3)} <= present for g in groups)


def test_compact_folds_segments_into_a_new_base(model: LinkingModel, folder: Path) -> None:
    s = LiveSearcher(folder, model.fingerprint())
    kb = LiveKb(model, s, 5.0)
    kb.upsert([NewEntity(Entity("Z4", "Wanda Xylo", "Occupation: potter."))])
    kb.delete(["E10"])
    q = _query(model, "Wanda Xylo", "Wanda Xylo made a pot.")
    before = _ids(s, s.search(q, 10).rows[0])
    n = len(s)
    keys_of = lambda t, c: model.matcher.retrieval_keys_of(t, c).numpy()  # noqa: E731
    m = compact(folder, keys_of, folder.with_name("compacted"))
    assert m.entity_count == n and m.history[-1]["compacted"]["tombstones"] == 1
    c = LiveSearcher(folder.with_name("compacted"), model.fingerprint())
    assert c.generation == 0 and c.tombstones == 0 and len(c) == n
    assert _ids(c, c.search(q, 10).rows[0]) == before
    # in place: the folder itself becomes the compacted base
    compact(folder, keys_of)
    assert not (folder / LIVE_DIR).exists() and _entity_count(folder) == n


def _entity_count(folder: Path) -> int:
    return int(json.loads((folder / "manifest.json").read_text())["entity_count"])


# ---------------------------------------------------------------------- over HTTP


def test_admin_routes_need_an_admin_key(artifacts: tuple[Path, Path], folder: Path) -> None:
    body = {"name": "Nobody"}
    with serve(_settings((artifacts[0], folder), api_keys=["user"])) as (base, _):
        r = httpx.put(f"{base}/v1/admin/entities/X", json=body, headers={"X-API-Key": "user"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    with serve(_settings((artifacts[0], folder), api_keys=["user"], admin_keys=["adm"])) as (
        base,
        _,
    ):
        assert httpx.put(f"{base}/v1/admin/entities/X", json=body).status_code == 401
        r = httpx.put(f"{base}/v1/admin/entities/X", json=body, headers={"X-API-Key": "user"})
        assert r.status_code == 401  # an API key is not an admin key header
        r = httpx.put(
            f"{base}/v1/admin/entities/X", json=body, headers={"Authorization": "Bearer user"}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert httpx.delete(f"{base}/v1/admin/entities/X", headers=ADMIN).status_code == 404
        r = httpx.put(f"{base}/v1/admin/entities/X", json=body, headers=ADMIN)
        assert r.status_code == 200 and r.json()["added"] == ["X"]


def test_add_update_delete_round_trip_survives_a_restart(
    artifacts: tuple[Path, Path], folder: Path
) -> None:
    settings = _settings((artifacts[0], folder), admin_keys=["adm"])
    link = {"mention": "Yara Quill", "sentence": "Yara Quill the cartographer spoke.", "top_k": 3}
    with serve(settings) as (base, _):
        before = httpx.post(f"{base}/v1/link", json=link).json()
        assert all(c["entity_id"] != "Y1" for c in before["candidates"])
        r = httpx.post(
            f"{base}/v1/admin/entities",
            json={
                "entities": [
                    {
                        "id": "Y1",
                        "name": "Yara Quill",
                        "attributes": "Occupation: cartographer.",
                        "aliases": ["Y. Quill"],
                        "image": _b64(_png((10, 200, 200))),
                    },
                    {"id": "Y2", "name": "Yves Quillon"},
                ]
            },
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        assert r.json()["added"] == ["Y1", "Y2"]
        version = r.json()["index_version"]
        after = httpx.post(f"{base}/v1/link", json=link).json()  # the next request sees it
        assert after["index_version"] == version != before["index_version"]
        assert after["candidates"][0]["entity_id"] == "Y1"
        img = httpx.get(f"{base}/v1/entities/Y1/image")
        assert img.status_code == 200 and img.content == _png((10, 200, 200))
        assert httpx.get(f"{base}/v1/entities/Y2/image").status_code == 404
        # replace through the multipart form, then delete
        r = httpx.post(
            f"{base}/v1/admin/entities/form",
            data={"entity": json.dumps({"id": "Y2", "name": "Yves Quillon", "attributes": "B."})},
            files={"image": ("y2.png", _png((200, 10, 10)), "image/png")},
            headers=ADMIN,
        )
        assert r.status_code == 200 and r.json()["replaced"] == ["Y2"], r.text
        assert httpx.get(f"{base}/v1/entities/Y2").json()["attributes"] == "B."
        r = httpx.delete(f"{base}/v1/admin/entities/E00", headers=ADMIN)
        assert r.status_code == 200 and r.json()["deleted"] == ["E00"]
        last_version = r.json()["index_version"]
        assert httpx.get(f"{base}/v1/entities/E00").status_code == 404
        ames = {"mention": "Jo Ames", "sentence": "Jo Ames the painter.", "top_k": 20}
        out = httpx.post(f"{base}/v1/link", json=ames).json()
        assert "E00" not in [c["entity_id"] for c in out["candidates"]]
        bad = httpx.put(f"{base}/v1/admin/entities/Q", json={"name": ""}, headers=ADMIN)
        assert bad.status_code == 422
        bad = httpx.put(
            f"{base}/v1/admin/entities/Q", json={"name": "Q", "image": "!!"}, headers=ADMIN
        )
        assert bad.status_code == 400
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["live"] == {"segments": 3, "live_entities": 2, "tombstones": 2}
    with serve(settings) as (base, _):  # a restart keeps every acknowledged update
        assert httpx.get(f"{base}/readyz").json()["index_version"] == last_version
        assert httpx.post(f"{base}/v1/link", json=link).json()["candidates"][0]["entity_id"] == "Y1"
        assert httpx.get(f"{base}/v1/entities/E00").status_code == 404
        assert httpx.get(f"{base}/v1/entities/Y1/image").status_code == 200


def test_swap_under_load_fails_no_request(
    artifacts: tuple[Path, Path], folder: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    model = LinkingModel.from_pretrained(artifacts[0]).eval()
    s = LiveSearcher(other, model.fingerprint())
    LiveKb(model, s, 5.0).upsert([NewEntity(Entity("N1", "Jo Ames", "Occupation: diver."))])
    new_version = s.version
    s.close()
    settings = _settings((artifacts[0], folder), admin_keys=["adm"])
    with serve(settings) as (base, _):
        old_version = httpx.get(f"{base}/readyz").json()["index_version"]
        body = {"mention": "Jo Ames", "sentence": "Jo Ames spoke.", "top_k": 20}
        # warm the result cache under the old version: it must not be served after the swap
        assert httpx.post(f"{base}/v1/link", json=body).json()["index_version"] == old_version
        stop = threading.Event()
        seen: list[tuple[int, str, float]] = []

        def hammer(i: int) -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    r = c.post(f"{base}/v1/link", json={**body, "sentence": f"Jo Ames {i % 4}."})
                    v = r.json().get("index_version", "") if r.status_code == 200 else ""
                    seen.append((r.status_code, v, time.monotonic()))

        with ThreadPoolExecutor(16) as pool:
            for i in range(16):
                pool.submit(hammer, i)
            time.sleep(1.5)
            paths = [str(other), str(folder), str(other)]
            for p in paths:
                r = httpx.post(
                    f"{base}/v1/admin/swap", json={"index_path": p}, headers=ADMIN, timeout=60
                )
                assert r.status_code == 200, r.text
                time.sleep(1.0)
            swapped_at = time.monotonic()
            time.sleep(1.0)
            stop.set()
        assert seen and all(code == 200 for code, _, _ in seen)
        assert {v for _, v, _ in seen} == {old_version, new_version}
        late = [v for _, v, t in seen if t > swapped_at + 0.5]
        assert late and set(late) == {new_version}
        out = httpx.post(f"{base}/v1/link", json=body).json()
        assert out["index_version"] == new_version and not out["timings"]["cached"]
        assert "N1" in [c["entity_id"] for c in out["candidates"]]
        bad = httpx.post(
            f"{base}/v1/admin/swap", json={"index_path": str(tmp_path / "nope")}, headers=ADMIN
        )
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "swap_failed"
        assert httpx.post(f"{base}/v1/link", json=body).status_code == 200  # still serving


def test_a_reranker_still_training_is_picked_up_when_ready(
    artifacts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """... and the generation it brings re-takes the default worker plan: the core that its
    training held at start (make demo's background stages) is free again."""
    import models.threads

    free = {"cores": 1}
    monkeypatch.setattr(models.threads, "default_threads", lambda reserve=0: free["cores"])
    target = tmp_path / "drin" / "best"
    (tmp_path / "drin").mkdir()
    (tmp_path / "drin" / "status.json").write_text(json.dumps({"state": "training", "epoch": 2}))
    # neither count set (the suite's MEL_INTRA_OP_THREADS=1 overridden): the default plan
    settings = _settings(
        artifacts, drin_model_path=str(target), reload_poll_s=0.2, intra_op_threads=None
    )
    with serve(settings) as (base, _):
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["rerankers"] == ["mimic", "none"]
        assert (ready["model_workers"], ready["towers_beside"]) == (1, False)
        assert ready["pending"]["drin"]["state"] == "training"
        assert ready["pending"]["drin"]["epoch"] == 2
        r = httpx.post(
            f"{base}/v1/link", json={"mention": "Jo", "sentence": "", "reranker": "drin"}
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "reranker_unavailable"
        model = LinkingModel.from_pretrained(artifacts[0])
        drin = DrinReranker(DrinRerankerConfig.for_backbone(model.encoder.backbone, hidden=16))
        drin.save_pretrained(
            target, meta={"backbone_weights": model.encoder.backbone.weights_fingerprint()}
        )
        free["cores"] = 2  # the trainer has exited
        deadline = time.monotonic() + 30
        while "drin" not in httpx.get(f"{base}/readyz").json()["rerankers"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["pending"] == {}
        assert (ready["model_workers"], ready["intra_op_threads"]) == (2, 1)
        assert ready["towers_beside"] is True
        r = httpx.post(
            f"{base}/v1/link", json={"mention": "Jo", "sentence": "", "reranker": "drin"}
        )
        assert r.status_code == 200 and r.json()["reranker"] == "drin"


def test_sighup_reloads_the_configured_folders(
    artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    current = tmp_path / "index-current"
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(artifacts[1], first)
    shutil.copytree(artifacts[1], second)
    model = LinkingModel.from_pretrained(artifacts[0]).eval()
    s = LiveSearcher(second, model.fingerprint())
    LiveKb(model, s, 5.0).upsert([NewEntity(Entity("H1", "Hugo Hup", ""))])
    s.close()
    current.symlink_to(first)
    proc, base = start_cli(artifacts[0], current)
    try:
        deadline = time.monotonic() + 60
        assert httpx.get(f"{base}/v1/entities/H1").status_code == 404
        current.unlink()
        current.symlink_to(second)
        proc.send_signal(signal.SIGHUP)
        while httpx.get(f"{base}/v1/entities/H1").status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_updates_from_another_process_become_visible(
    artifacts: tuple[Path, Path], folder: Path
) -> None:
    with serve(_settings((artifacts[0], folder), live_poll_s=0.2)) as (base, _):
        assert httpx.get(f"{base}/v1/entities/R1").status_code == 404
        model = LinkingModel.from_pretrained(artifacts[0]).eval()
        s = LiveSearcher(folder, model.fingerprint())  # a second writer: another replica
        LiveKb(model, s, 5.0).upsert([NewEntity(Entity("R1", "Rhea Replica", ""))])
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/v1/entities/R1").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
