"""``mel-serve``: run the linking server (settings from MEL_* environment variables + flags).

mel-serve --model artifacts/demo-model/best --index artifacts/demo-index --port 8000 \
          --drin artifacts/demo-drin/best      # also offer reranker=drin
mel-serve ... --fusion artifacts/fusion             # reranker=fusion and confidences
MEL_REDIS_URL=redis://127.0.0.1:6379/0 MEL_API_KEYS='["s3cret"]' mel-serve
mel-serve --print-settings        # every setting, its default and why
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from service.settings import ServiceSettings


def settings_table() -> str:
    rows = ["| env variable | default | meaning |", "| --- | --- | --- |"]
    for name, f in ServiceSettings.model_fields.items():
        rows.append(f"| `MEL_{name.upper()}` | `{json.dumps(f.default)}` | {f.description} |")
    return "\n".join(rows)


def _announce(service: Any, since: float) -> None:
    """Wait until the service is ready, then print the time since ``since``."""
    while not service.ready:
        if service.load_error:
            return
        time.sleep(0.2)
    secs = time.time() - since
    pending = ", ".join(service.state.pending) if service.state is not None else ""
    print(
        f"\n*** ready: {int(secs // 60)} min {secs % 60:.0f} s after `make demo` started "
        f"(still training in the background: {pending or 'nothing'}) ***\n",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mel-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="checkpoint folder (MEL_MODEL_PATH)")
    p.add_argument("--index", help="index folder (MEL_INDEX_PATH)")
    p.add_argument("--drin", help="DRIN checkpoint folder for reranker=drin (MEL_DRIN_MODEL_PATH)")
    p.add_argument(
        "--fusion", help="fusion model folder for reranker=fusion (MEL_FUSION_MODEL_PATH)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--print-settings", action="store_true", help="print the settings table (markdown) and exit"
    )
    p.add_argument(
        "--announce-since",
        type=float,
        metavar="EPOCH",
        help="print how long after this Unix time the server became ready (make demo's "
        "'first answer after N min')",
    )
    a = p.parse_args(argv)
    if a.print_settings:
        print(settings_table())
        return 0
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {
        k: v
        for k, v in (
            ("model_path", a.model),
            ("index_path", a.index),
            ("drin_model_path", a.drin),
            ("fusion_model_path", a.fusion),
        )
        if v
    }
    settings = ServiceSettings(**overrides)

    import uvicorn

    from service.app import create_app

    # uvicorn drains on SIGTERM, then re-raises the signal under the handler that was there
    # before it started: with the default one the process dies with 143, which supervisors
    # count as a crash. A no-op handler lets a clean drain end as exit code 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    app = create_app(settings)
    if a.announce_since is not None:
        threading.Thread(
            target=_announce, args=(app.state.service, a.announce_since), daemon=True
        ).start()
    uvicorn.run(
        app,
        host=a.host,
        port=a.port,
        log_level=a.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
