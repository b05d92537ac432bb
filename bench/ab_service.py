"""Two commits' servers under the same load, alternating, in one invocation.

    python bench/ab_service.py --base <commit> [--head <commit or dir>] --rounds 3

Checks each commit out into a temporary worktree (``--head`` defaults to this working tree),
then runs ``bench/load_bench.py`` (this tree's client) ``--rounds`` times per side, the order
alternating (base, head, head, base, ...) so a slow minute of this noisy machine hits both
sides alike. The server subprocess imports the side's code through ``PYTHONPATH`` (the venv's
editable install resolves after it). Writes ``--results`` (JSON) and a markdown table beside
it: each side's median over rounds of every figure, and head / base ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (label, path into load_bench's JSON, higher is better)
FIGURES = [
    ("c1 p50 ms", ("single_c1", "p50_ms"), False),
    ("c1 p99 ms", ("single_c1", "p99_ms"), False),
    ("c1 req/s", ("single_c1", "req_per_s"), True),
    ("c16 p50 ms", ("single_c16", "p50_ms"), False),
    ("c16 p99 ms", ("single_c16", "p99_ms"), False),
    ("c16 req/s", ("single_c16", "req_per_s"), True),
    ("batch vs sequential", ("batch", "speedup"), True),
    ("cache hit p50 ms", ("cache", "hit", "p50_ms"), False),
]


def dig(d: Any, path: tuple[str, ...]) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, int | float) else None


def worktree(commit: str, tmp: Path) -> Path:
    out = tmp / commit.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(out), commit], check=True
    )
    return out


def alternate(
    base: str,
    head: str | None,
    rounds: int,
    run: Callable[[str, Path, Path], dict[str, Any]],
    prefix: str = "mel-ab-",
) -> dict[str, list[dict[str, Any]]]:
    """``run(side, source tree, JSON path)`` ``rounds`` times per side, the order alternating
    (base, head, head, base, ...): the base checked out into a temporary worktree, the head
    too when given (else this working tree); the worktrees are removed after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as t:
        tmp = Path(t)
        sides = {"base": worktree(base, tmp), "head": worktree(head, tmp) if head else ROOT}
        runs: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
        try:
            for r in range(rounds):
                for side in ["base", "head"] if r % 2 == 0 else ["head", "base"]:
                    print(f"round {r + 1}/{rounds}: {side}", flush=True)
                    runs[side].append(run(side, sides[side], tmp / f"{side}-{r}.json"))
        finally:
            for path in sides.values():
                if path != ROOT:
                    subprocess.run(
                        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                        check=False,
                    )
    return runs


def run_side(side: str, src: Path, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    model = (a.base_model if side == "base" else None) or a.model
    index = (a.base_index if side == "base" else None) or a.index
    cmd = [sys.executable, str(HERE / "load_bench.py"), "--results", str(out)]
    cmd += ["--model", model, "--data", a.data, "--index", index, *a.load_args]
    for pair in a.base_env if side == "base" else a.head_env:
        cmd += ["--server-env", pair]
    subprocess.run(cmd, env=env, check=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="commit to compare against")
    p.add_argument("--head", help="commit (default: this working tree)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="artifacts/demo-model/best")
    p.add_argument("--data", default="artifacts/demo-world")
    p.add_argument("--index", default="artifacts/bench/demo-index-flat")
    p.add_argument(
        "--base-model",
        help="the base side's checkpoint (default --model): a base whose model format "
        "predates this code's, trained by its own code",
    )
    p.add_argument("--base-index", help="the base side's index folder, built by its own code")
    p.add_argument(
        "--base-env",
        action="append",
        default=[],
        metavar="MEL_NAME=VALUE",
        help="a server setting for the base side only (repeatable); with --base HEAD on a "
        "clean tree this compares settings on one commit",
    )
    p.add_argument("--head-env", action="append", default=[], metavar="MEL_NAME=VALUE")
    p.add_argument("--results", default="bench/results/service-ab.json")
    p.add_argument(
        "load_args", nargs="*", help="passed to load_bench.py after --, e.g. -- --single 60"
    )
    a = p.parse_args()
    runs = alternate(a.base, a.head, a.rounds, lambda side, src, out: run_side(side, src, a, out))
    rows = []
    levels = sorted(
        {
            int(k[len("single_c") :])
            for r in runs["base"] + runs["head"]
            for k in r
            if k.startswith("single_c")
        }
        - {1, 16}
    )
    figures = list(FIGURES)
    for level in levels:  # load_bench --levels
        figures += [
            (f"c{level} p50 ms", (f"single_c{level}", "p50_ms"), False),
            (f"c{level} p99 ms", (f"single_c{level}", "p99_ms"), False),
            (f"c{level} req/s", (f"single_c{level}", "req_per_s"), True),
        ]
    for label, path, higher in figures:
        med = {}
        for side in ("base", "head"):
            vals = [v for v in (dig(x, path) for x in runs[side]) if v is not None]
            med[side] = statistics.median(vals) if vals else None
            med[side + "_rounds"] = vals
        b, h = med["base"], med["head"]
        ratio = round(h / b, 3) if b and h else None
        rows.append({"figure": label, "higher_is_better": higher, **med, "head_over_base": ratio})
    doc = {
        "machine": _machine.machine_info(("torch", "faiss", "fastapi", "uvicorn")),
        "base": a.base,
        "head": a.head or "working tree",
        "rounds": a.rounds,
        "models": {"base": a.base_model or a.model, "head": a.model},
        "indexes": {"base": a.base_index or a.index, "head": a.index},
        "load_args": a.load_args,
        "env": {"base": a.base_env, "head": a.head_env},
        "figures": rows,
    }
    Path(a.results).write_text(json.dumps(doc, indent=1))
    md = [
        f"# Service A/B: {doc['head']} vs {a.base}",
        "",
        f"`python bench/ab_service.py --base {a.base} --rounds {a.rounds}"
        + f" --model {a.model} --index {a.index}"
        + (f" --base-model {a.base_model}" if a.base_model else "")
        + (f" --base-index {a.base_index}" if a.base_index else "")
        + "".join(f" --base-env {e}" for e in a.base_env)
        + "".join(f" --head-env {e}" for e in a.head_env)
        + (f" -- {' '.join(a.load_args)}" if a.load_args else "")
        + "`: each side's median over rounds (order alternated); ratio = head / base.",
        "",
        "| figure | base | head | head / base | rounds base | rounds head |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        md.append(
            f"| {row['figure']} | {row['base']} | {row['head']} | {row['head_over_base']} | "
            f"{row['base_rounds']} | {row['head_rounds']} |"
        )
    m = doc["machine"]
    md += ["", f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; {m.get('date', '')}."]
    Path(a.results).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
