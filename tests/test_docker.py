"""docker/ files are honest: parsed and checked against the code (Docker cannot run here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.settings import ServiceSettings

DOCKER = Path(__file__).resolve().parents[1] / "docker"
SETTINGS = {f"MEL_{name.upper()}" for name in ServiceSettings.model_fields}


def _instructions(path: Path) -> list[tuple[str, str]]:
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cur = f"{cur} {line[:-1]}" if line.endswith("\\") else f"{cur} {line}"
        if not line.endswith("\\"):
            op, _, rest = cur.strip().partition(" ")
            lines.append((op.upper(), rest.strip()))
            cur = ""
    return lines


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles(name: str) -> None:
    ins = _instructions(DOCKER / name)
    ops = [op for op, _ in ins]
    assert ops[0] == "FROM"
    copies = [rest for op, rest in ins if op == "COPY"]
    # dependency layer (pyproject) before the code
    assert copies[0].startswith("pyproject.toml")
    first_code = next(i for i, c in enumerate(copies) if c.startswith(("service", "models")))
    assert first_code > 0
    runs_before_code = [
        rest for op, rest in ins[: ops.index("COPY", ops.index("COPY") + 1)] if op == "RUN"
    ]
    assert any("pip install" in r and "torch==2.13.0" in r for r in runs_before_code)
    user = [rest for op, rest in ins if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")
    cmd = [rest for op, rest in ins if op == "CMD"][-1]
    assert "mel-serve" in cmd and "8000" in cmd
    assert any(op == "EXPOSE" and rest == "8000" for op, rest in ins)
    env = " ".join(rest for op, rest in ins if op == "ENV")
    for token in env.split():
        key = token.split("=")[0]
        if key.startswith("MEL_"):
            assert key in SETTINGS, f"{name}: {key} is not a setting"
    if name.endswith(".gpu"):
        assert "faiss-gpu" in " ".join(r for op, r in ins if op == "RUN")


def test_compose_and_prometheus() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"api", "redis", "prometheus"}
    api = services["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile"
    for key in api["environment"]:
        assert key in SETTINGS, f"compose sets unknown setting {key}"
    assert api["environment"]["MEL_REDIS_URL"].startswith("redis://redis:6379")
    assert "redis" in api["depends_on"]
    mounts = {v.split(":")[1] for v in api["volumes"]}
    paths = ("MEL_MODEL_PATH", "MEL_INDEX_PATH", "MEL_DRIN_MODEL_PATH")
    assert {api["environment"][k] for k in paths} <= mounts
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
