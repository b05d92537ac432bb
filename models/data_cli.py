"""``mel-data``: generate the demo world, convert published MEL datasets, summarise a dataset.

mel-data demo --out artifacts/demo-world [--entities 2000] [--seed 0]
mel-data convert-mimic --src /data/WikiMEL --out data/wikimel-canonical
mel-data convert-melbench --src ../shared/data/wikimel --out artifacts/wikimel
mel-data summary artifacts/demo-world
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from models.data.schema import RecordReport, load_dataset

logger = logging.getLogger("mel-data")


def _cmd_demo(args: argparse.Namespace) -> int:
    from models.data.demo_world import DemoWorldConfig, generate_demo_world

    config = DemoWorldConfig(num_entities=args.entities, seed=args.seed)
    summary = generate_demo_world(Path(args.out), config)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_convert_mimic(args: argparse.Namespace) -> int:
    from models.data.converters import convert_mimic

    report = convert_mimic(
        Path(args.src),
        Path(args.out),
        kb_file=args.kb,
        qid2id_file=args.qid2id,
        split_files={
            k: v for k, v in (("train", args.train), ("dev", args.dev), ("test", args.test)) if v
        },
        kb_image_dir=args.kb_images,
        mention_image_dir=args.mention_images,
        copy_images=args.copy_images,
    )
    print(json.dumps(report.to_json(), indent=1))
    return 0


def _cmd_convert_melbench(args: argparse.Namespace) -> int:
    from models.data.converters import convert_melbench

    report = convert_melbench(Path(args.src), Path(args.out), copy_images=args.copy_images)
    print(json.dumps(report.to_json(), indent=1))
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    ds = load_dataset(Path(args.root))
    out = ds.summary()
    out["report"] = ds.all_problems().to_json()
    out["found"] = {
        "converting": RecordReport.from_json(ds.meta.get("report")).total,
        "loading": ds.report.total,
    }
    print(json.dumps(out, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mel-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="generate the deterministic demo world")
    d.add_argument("--out", required=True, help="output dataset folder")
    d.add_argument("--entities", type=int, default=2000, help="number of KB entities")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)

    m = sub.add_parser(
        "convert-mimic",
        help="convert the MIMIC authors' cleaned layout (WikiMEL/RichpediaMEL/"
        "WikiDiverse: kb_entity.json, qid2id.json, {split}.json, image folders)",
    )
    m.add_argument("--src", required=True, help="folder holding the files (auto-detected)")
    m.add_argument("--out", required=True, help="output canonical dataset folder")
    m.add_argument("--kb", help="entity file (default: <src>/kb_entity.json)")
    m.add_argument("--qid2id", help="qid2id file (default: <src>/qid2id.json)")
    m.add_argument("--train", help="train split file (default: <src>/*train*.json)")
    m.add_argument("--dev", help="dev split file (default: <src>/*dev*.json)")
    m.add_argument("--test", help="test split file (default: <src>/*test*.json)")
    m.add_argument("--kb-images", help="entity image folder (default: <src>/kb_image)")
    m.add_argument("--mention-images", help="mention image folder (default: <src>/mention_image)")
    m.add_argument(
        "--copy-images",
        action="store_true",
        help="copy image files instead of linking the source folders",
    )
    m.set_defaults(func=_cmd_convert_mimic)

    b = sub.add_parser(
        "convert-melbench",
        help="convert the MELBench + GHMFC layout (Wikidata-MEL.json, qid2ne.json, "
        "qid2abs.json, splits.json, mention_images/)",
    )
    b.add_argument("--src", required=True, help="folder holding the files")
    b.add_argument("--out", required=True, help="output canonical dataset folder")
    b.add_argument(
        "--copy-images",
        action="store_true",
        help="copy image files instead of linking the source folder",
    )
    b.set_defaults(func=_cmd_convert_melbench)

    s = sub.add_parser("summary", help="load a canonical dataset and print counts + bad records")
    s.add_argument("root")
    s.set_defaults(func=_cmd_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
