"""Fusion's candidate names read and analysed at load, against on first sight, side by side.

    python bench/fusion_names.py --work artifacts/bench-wikimel-names-only \\
        --out bench/results/fusion-names.json

``Linker.link`` with reranker=fusion and reranker=mimic on encoded test mentions of a bench
work folder (``bench/wikimel.py --work``), one mention at a time and 32 at a time, medians per
mention. "first sight": the fusion reranker's candidate names read from the store through its
LRU and analysed when a list first holds them, both caches empty at the start of each pass
(how a request met a name before ``CandidateInfoReader`` preloaded them); "at load": read and
analysed before the pass (what the server now does when it loads a KB of up to
``service.rerankers.INFO_PRELOAD`` entities). The sides alternate, pass by pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import _links  # bench/_links.py (bench/ is on sys.path when a script runs)
import _machine  # bench/_machine.py

from models import lexical
from service.rerankers import CandidateInfoReader, FusionReranker

SIDES = ("first_sight", "at_load")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _links.add_work_args(p, "bench/results/fusion-names.json")
    a = p.parse_args()
    linker = _links.work_linker(a.work, a.threads)
    fusion = linker.rerankers["fusion"]
    assert isinstance(fusion, FusionReranker)
    preloaded = fusion.info
    if not preloaded.loaded:
        raise SystemExit(f"{a.work}: the KB is over the preload size; nothing to compare")
    names = [s for info in preloaded.loaded.values() for s in info.names]
    items, encoded = _links.encoded_test(linker, a.work, a.mentions)
    per: _links.Times = {}
    for _ in range(a.rounds):
        for side in SIDES:
            lexical._analyse.cache_clear()
            if side == "at_load":
                fusion.info = preloaded
                lexical.analyse_names(names)
            else:
                fusion.info = CandidateInfoReader(linker.searcher, preload=0)
            _links.time_links(linker, items, encoded, side, ("mimic", "fusion"), per)
    res = _links.results(
        "Linker.link per mention: fusion's candidate names on first sight vs at load",
        a,
        linker,
        len(items),
        per,
        names=len(names),
    )
    print(_machine.write_results(a.out, res, render))
    linker.close()
    return 0


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    by = {(r["side"], r["batch"], r["reranker"]): r["ms_per_mention"] for r in res["rows"]}
    lines = [
        "# Fusion's candidate names: on first sight against read and analysed at load",
        "",
        f"{res['what']}: {res['work']} ({res['entities']:,} entities, {res['names']:,} names), "
        f"{res['mentions']} test mentions, {res['threads']} intra-op threads, K = 100 (+ the "
        f"lexical channel's); median ms per mention over {res['rounds']} rounds, the sides "
        f"alternating. Machine: {m['cpu']}, commit {m['commit']}, {m['date']}.",
        "",
        "| batch | MIMIC ms | fusion ms, names on first sight | fusion ms, names at load | "
        "fusion adds: first sight -> at load |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b in (1, 32):
        mimic = statistics.median([by[(s, b, "mimic")] for s in SIDES])
        cold, warm = by[("first_sight", b, "fusion")], by[("at_load", b, "fusion")]
        add_cold = cold - by[("first_sight", b, "mimic")]
        add_warm = warm - by[("at_load", b, "mimic")]
        lines.append(
            f"| {b} | {mimic:.2f} | {cold:.2f} | {warm:.2f} | {add_cold:.2f} -> {add_warm:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
