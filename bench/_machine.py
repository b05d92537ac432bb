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


def machine_info(libraries: Sequence[str] = ("torch", "faiss"), **extra: Any) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
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
