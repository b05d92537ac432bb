"""What fusion adds per mention, two commits side by side, alternating, in one invocation.

    python bench/fusion_ab.py --base <commit> --work artifacts/wikimel-bench [--rounds 3]

Runs ``bench/wikimel.py``'s fusion latency stage (``Linker.link`` with reranker=fusion
against reranker=mimic on the same encoded test mentions, one at a time and 32 at a time) on
one protocol work folder (``make bench-wikimel`` leaves one; the stage reads its MIMIC model,
index, fusion model and tables) with each commit's code: the base checked out into a
temporary worktree, the head this working tree (or ``--head``), each in its own process
through ``PYTHONPATH``, ``--rounds`` times per side in alternating order (base, head, head,
base, ...) so a slow minute of this noisy machine hits both alike. Writes ``--out`` (JSON)
and a markdown table beside it: each side's median over rounds, head - base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import _machine  # bench/_machine.py
from ab_service import alternate, dig  # bench/ab_service.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (label, path into the stage's result)
FIGURES = [
    ("fusion adds, one mention (ms)", ("batch1", "fusion_adds_ms")),
    ("MIMIC link, one mention (ms)", ("batch1", "mimic_ms_per_mention")),
    ("fusion link, one mention (ms)", ("batch1", "fusion_ms_per_mention")),
    ("fusion adds, batches of 32 (ms per mention)", ("batch32", "fusion_adds_ms")),
    ("features + trees of a test list (ms)", ("features_and_trees_ms",)),
]

# run in the side's own tree (sys.path and PYTHONPATH point at it): the stage, as the
# protocol runs it
_DRIVER = """
import argparse, json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(sys.argv[1]) / "bench"))
import wikimel
torch.set_num_threads(int(sys.argv[4]))
a = argparse.Namespace(work=Path(sys.argv[2]))
Path(sys.argv[3]).write_text(json.dumps(wikimel.stage_fusion_latency(a, int(sys.argv[5]))))
"""


def run_side(src: Path, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", _DRIVER, str(src), str(a.work.resolve()), str(out)]
    subprocess.run([*cmd, str(a.threads), str(a.reps)], env=env, check=True, cwd=src)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def render(doc: dict[str, Any]) -> str:
    md = [
        f"# What fusion adds: {doc['head']} vs {doc['base']}",
        "",
        f"`python bench/fusion_ab.py --base {doc['base']} --work {doc['work']} --rounds "
        f"{doc['rounds']}`: `bench/wikimel.py`'s fusion latency stage ({doc['reps']} test "
        f"mentions, torch {doc['threads']} threads) with each commit's code on the same "
        "work folder, sides alternating; each side's median over rounds.",
        "",
        "| figure | base | head | head - base | rounds base | rounds head |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in doc["figures"]:
        b, h = row["base"], row["head"]
        diff = f"{h - b:+.3f}" if b is not None and h is not None else ""
        md.append(
            f"| {row['figure']} | {b} | {h} | {diff} | {row['base_rounds']} | "
            f"{row['head_rounds']} |"
        )
    parts = doc.get("head_parts_ms")
    if parts:
        md += [
            "",
            "The head's pieces side by side in its own runs (medians over rounds, ms per test "
            "list): " + ", ".join(f"{k} {v}" for k, v in parts.items()) + ".",
        ]
    m = doc["machine"]
    md += [
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; commit "
        f"{m.get('commit', '?')}; {m.get('date', '')}.",
    ]
    return "\n".join(md) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="commit to compare against")
    p.add_argument("--head", help="commit (default: this working tree)")
    p.add_argument("--work", type=Path, required=True, help="a bench/wikimel.py work folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=160, help="test mentions per stage run")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the protocol's)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "fusion-ab.json")
    a = p.parse_args()
    runs = alternate(
        a.base,
        a.head,
        a.rounds,
        lambda _side, src, out: run_side(src, a, out),
        prefix="mel-fusion-ab-",
    )
    rows = []
    for label, path in FIGURES:
        row: dict[str, Any] = {"figure": label}
        for side in ("base", "head"):
            vals = [v for v in (dig(x, path) for x in runs[side]) if v is not None]
            row[side] = round(statistics.median(vals), 3) if vals else None
            row[side + "_rounds"] = vals
        rows.append(row)
    head_parts = [x["parts_ms"] for x in runs["head"] if "parts_ms" in x]
    doc = {
        "base": a.base,
        "head": a.head or "working tree",
        "work": str(a.work),
        "rounds": a.rounds,
        "reps": a.reps,
        "threads": a.threads,
        "figures": rows,
        "head_parts_ms": {
            k: round(statistics.median(p[k] for p in head_parts), 3) for k in head_parts[0]
        }
        if head_parts
        else None,
        "runs": runs,
        "machine": _machine.machine_info(("torch", "faiss", "lightgbm", "lleaves")),
    }
    print(_machine.write_results(a.out, doc, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
