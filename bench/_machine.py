"""What every benchmark records about where it ran (CPU, cores, versions, commit, date)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def dist_version(*dists: str) -> str:
    """Installed version of the first distribution found (e.g. faiss-cpu or faiss-gpu)."""
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def write_results(path: Path, res: Any, render: Callable[[Any], str]) -> str:
    """Write a benchmark's JSON and its markdown rendering side by side; returns the markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    md = render(res)
    path.with_suffix(".md").write_text(md)
    return md


def cpu_name(lscpu: str) -> str | None:
    """The CPU as ``lscpu`` names it, with its family / model and widest vector ISA: a
    shared host's CPU is often named only "AMD EPYC", and the same name covered CPUs a
    generation apart (ONNX Runtime's kernels ran 2x faster on one than another)."""
    fields = {}
    for row in lscpu.splitlines():
        key, sep, value = row.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    name = fields.get("Model name")
    if not name:
        return None
    flags = set(fields.get("Flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    detail = [f"family {fields['CPU family']} model {fields['Model']}"] if "Model" in fields else []
    detail += [isa] if isa else []
    return f"{name} ({', '.join(detail)})" if detail else name


def machine_info(libraries: Sequence[str] = ("torch", "faiss"), **extra: Any) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = cpu_name(out) or cpu
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    versions = {
        lib: dist_version("faiss-cpu", "faiss-gpu", "faiss")
        if lib == "faiss"
        else dist_version(lib)
        for lib in libraries
    }
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        **extra,
        **versions,
        "python": platform.python_version(),
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def line(m: dict[str, Any], libraries: Sequence[str]) -> str:
    """The markdown line for a ``machine_info`` record: CPU, cores, the libraries' versions,
    commit, date, and the load average when the bench recorded one."""
    libs = ", ".join(f"{lib} {m.get(lib, '?')}" for lib in libraries)
    load = f"; load average {m['loadavg']} (a shared machine)" if "loadavg" in m else ""
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores; {libs}; commit {m['commit']}; {m['date']}{load}."
    )
