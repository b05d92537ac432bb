"""``mel-index build --engine ray``: the same bytes as a local build; a killed actor is retried.

One local Ray instance (2 CPUs, no dashboard) is started for the module and shut down after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from index.build import BuildConfig, build
from index.errors import UnknownEngineError
from index.ray_engine import RayOptions
from index.store import FAISS_FILE, MANIFEST_FILE
from models.encoders import ClipBackbone
from models.model import LinkingModel
from tests.test_index import _entity_lines, _store_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # Ray's workers inherit the environment of the raylet this starts: they import the project
    # from this checkout, like the driver, and run one OpenMP thread each
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)
    os.environ["OMP_NUM_THREADS"] = "1"
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=80 * 1024 * 1024,
    )
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    model = LinkingModel.for_backbone(ClipBackbone.from_folder(tiny_clip_dir), dv=8, hidden=12)
    return model.save_pretrained(tmp_path_factory.mktemp("ray-model") / "ckpt")


def _kb(root: Path, n: int) -> Path:
    lines = _entity_lines(root, 0, n)
    lines.insert(7, "{broken json")  # counted in its chunk's report, like a local build
    lines.insert(12, json.dumps({"id": "Q3", "name": "dup"}))  # a duplicate id across chunks
    (root / "kb.jsonl").write_text("\n".join(lines) + "\n")
    return root / "kb.jsonl"


def _cfg(kb: Path, model: Path, out: Path, **kw: object) -> BuildConfig:
    base: dict[str, object] = dict(
        kb=str(kb),
        model=str(model),
        out=str(out),
        chunk_size=4,
        batch_size=3,
        workers=1,
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return BuildConfig(**base)  # type: ignore[arg-type]


def _same_folder(a: Path, b: Path) -> None:
    assert _store_bytes(a) == _store_bytes(b)
    assert (a / FAISS_FILE).read_bytes() == (b / FAISS_FILE).read_bytes()
    ma, mb = (json.loads((d / MANIFEST_FILE).read_text()) for d in (a, b))
    for m in (ma, mb):
        for k in ("built_at", "build_seconds"):
            m.pop(k)
    assert ma == mb


def _actor_pids(title: bytes = b"ray::ChunkActor.encode_chunk") -> list[int]:
    """Processes of actors running a method (Ray titles them by it: ChunkActors encoding a
    chunk by default)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().startswith(title):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def test_ray_build_with_a_killed_actor_is_byte_identical_to_a_local_build(
    local_ray: None, model_dir: Path, tmp_path: Path
) -> None:
    """Two actors; one is SIGKILLed mid-way, Ray restarts it and retries its chunk: the folder
    is still the local build's, byte for byte, with no chunk lost or doubled. (One test, not
    two: every actor start imports torch and loads the model, the bulk of the time here.)"""
    kb = _kb(tmp_path / "kb", 160)
    out = tmp_path / "ray"
    cfg = _cfg(kb, model_dir, out, chunk_size=2, engine="ray", ray=RayOptions(actors=2))
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["manifest"] = build(cfg, keep_chunks=True)
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    chunks = out / "chunks"
    deadline = time.monotonic() + 300  # actors import torch first: slow on a busy machine
    killed = None
    while time.monotonic() < deadline and t.is_alive():
        done = (
            len([c for c in chunks.glob("c*") if (c / "done").is_file()]) if chunks.is_dir() else 0
        )
        pids = _actor_pids()
        if done >= 3 and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert killed is not None, "the build finished before an actor could be killed"
    done_at_kill = len([c for c in chunks.glob("c*") if (c / "done").is_file()])
    t.join(timeout=300)
    assert "error" not in result, result.get("error")
    total = -(-(160 + 2) // 2)
    assert done_at_kill < total  # the kill landed mid-way
    assert len([c for c in chunks.iterdir() if not c.name.endswith(".tmp")]) == total
    m = result["manifest"]
    assert m.entity_count == 160  # type: ignore[attr-defined]
    assert m.bad_entities["counts"] == {"entity.bad_json": 1, "entity.duplicate_id": 1}  # type: ignore[attr-defined]
    build(_cfg(kb, model_dir, tmp_path / "local", chunk_size=2))
    _same_folder(tmp_path / "local", out)


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(UnknownEngineError, match="spark"):
        BuildConfig(kb="kb.jsonl", model="m", out="o", engine="spark")


def test_a_local_build_does_not_import_ray(model_dir: Path, tmp_path: Path) -> None:
    kb = _kb(tmp_path / "kb", 6)
    code = (
        "import sys; from index import cli; "
        f"rc = cli.main(['build', '--kb', {str(kb)!r}, '--model', {str(model_dir)!r}, "
        f"'--out', {str(tmp_path / 'out')!r}, '--device', 'cpu', '--no-progress']); "
        "assert rc == 0; assert 'ray' not in sys.modules, 'ray was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=False)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert (tmp_path / "out" / FAISS_FILE).is_file()


def test_ray_build_encodes_with_the_backends_default_runtime_like_a_local_build(
    local_ray: None, tmp_path: Path
) -> None:
    """minilm-effnet defaults to ONNX Runtime: the actors must encode with it too (the driver
    exports the towers once) and the manifest must say so, or the default server (onnx)
    refuses the index as encoded by another runtime."""
    import numpy as np

    from index.search import IndexSearcher
    from models.encoders import MiniLmEffNetBackbone

    torch.manual_seed(4)
    model = LinkingModel.for_backbone(MiniLmEffNetBackbone.from_packages(), dv=8, hidden=12)
    ckpt = model.save_pretrained(tmp_path / "minilm")
    kb = tmp_path / "kb" / "kb.jsonl"
    (tmp_path / "kb").mkdir()
    kb.write_text("\n".join(_entity_lines(tmp_path / "kb", 0, 8)) + "\n")
    onnx = str(tmp_path / "onnx")
    local = build(_cfg(kb, ckpt, tmp_path / "local", onnx_cache=onnx))
    ray_ = build(
        _cfg(kb, ckpt, tmp_path / "ray", onnx_cache=onnx, engine="ray", ray=RayOptions(actors=2))
    )
    assert not isinstance(local, dict) and not isinstance(ray_, dict)
    assert local.encoder_runtime == ray_.encoder_runtime == "onnx"
    searchers = [
        IndexSearcher(tmp_path / d, ray_.model_fingerprint, encoder_runtime="onnx")
        for d in ("local", "ray")
    ]
    rows = np.arange(8)[None, :]
    for a, b in zip(*(s.fields(rows, ("text_cls", "cmfu")) for s in searchers), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-3)


# ---------------------------------------------------------------- mel-link --engine ray
def _link_cli(inp: Path, out: Path, model: Path, index: Path, *extra: str) -> list[str]:
    args = ["--in", str(inp), "--out", str(out), "--model", str(model), "--index", str(index)]
    args += ["--device", "cpu", "--batch-size", "4", "--no-progress", *extra]
    return args


def test_mel_link_on_ray_resumes_a_local_run_survives_a_killed_actor_and_matches_it(
    local_ray: None,
    tiny_world: Path,
    artifacts: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One Ray run does it all (every actor start loads a linker, the bulk of the time): it
    resumes a file a local run was killed in (a partial last line), one of its two actors is
    SIGKILLed mid-way (Ray restarts it and retries its block), and the file it leaves is the
    uninterrupted local run's, line for line, bad lines included."""
    from service.bulk import BulkOptions, link_file, main
    from service.linker import Linker
    from service.settings import ServiceSettings
    from tests.test_bulk import _lines, _mentions, _same, _write

    model, index = artifacts
    ms = _mentions(tiny_world)
    N = 400
    lines = [
        json.dumps(dict(ms[i % len(ms)], id=f"r{i}")) if i % 53 != 7 else "{not json"
        for i in range(N)
    ]
    inp = _write(tmp_path / "mentions.jsonl", lines, tiny_world)
    settings = ServiceSettings(
        model_path=str(model), index_path=str(index), device="cpu", use_faiss_gpu=False
    )
    linker = Linker(settings)
    full = tmp_path / "local.jsonl"
    link_file(linker, inp, full, BulkOptions(batch_size=4), progress=False)
    linker.close()
    out = tmp_path / "links.jsonl"
    data = full.read_bytes()
    cut = data.index(b"\n", len(data) // 20) + 30  # a local run killed inside line k + 1
    out.write_bytes(data[:cut])
    progress = Path(str(full) + ".progress.json")
    Path(str(out) + ".progress.json").write_bytes(progress.read_bytes())
    k = data[:cut].count(b"\n")
    args = _link_cli(inp, out, model, index, "--engine", "ray", "--ray-actors", "2")
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["rc"] = main([*args, "--ray-block-lines", "6"])
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 300
    killed = None
    while time.monotonic() < deadline and t.is_alive():
        pids = _actor_pids(b"ray::LinkActor.link_block")
        if out.read_bytes().count(b"\n") >= k + 30 and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert killed is not None, "the run finished before an actor could be killed"
    at_kill = out.read_bytes().count(b"\n")
    t.join(timeout=300)
    assert result.get("rc") == 0, result
    assert at_kill < N  # the kill landed mid-way
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["resumed_from"], report["written"]) == (k, N - k)
    assert report["errors"] == sum(1 for i in range(k, N) if i % 53 == 7)
    got = _lines(out)
    assert [g["line"] for g in got] == list(range(1, N + 1))
    _same(got, _lines(full))


def test_mel_link_on_ray_refuses_options_its_models_cannot_serve(
    local_ray: None, tiny_world: Path, artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    from service.bulk import main
    from tests.test_bulk import _mentions, _write

    model, index = artifacts
    inp = _write(tmp_path / "m.jsonl", [json.dumps(_mentions(tiny_world)[0])], tiny_world)
    out = tmp_path / "links.jsonl"
    args = _link_cli(inp, out, model, index, "--engine", "ray", "--ray-actors", "1")
    assert main([*args, "--reranker", "drin"]) == 1  # no DRIN model given
    assert not out.exists()
    assert main([*args, "--ray-block-lines", "0"]) == 1
