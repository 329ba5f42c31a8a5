"""Report: ``python -m coco_multilabel.report RUN_OR_SWEEP_DIR`` (``make report RUN=...``).

Writes ``<dir>/report/report.html``: learning curves, per-class scores, thresholds, PR curves, the
worst classes with their mistakes and the config of a run, a comparison of a sweep's jobs, or an
ensemble's members and figures (``a.ckpt,b.ckpt``, a sweep with ``--top n``; ``reporting/report.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from coco_multilabel.cli import report_user_errors
from coco_multilabel.reporting.report import report


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a run, sweep or make cv folder, or checkpoints a.ckpt,b.ckpt")
    parser.add_argument("--top", type=int, help="a sweep folder's n best jobs, as an ensemble")
    parser.add_argument("--data", help="the data root, if not the run's data.root")
    parser.add_argument("--out", help="where to write (default: <dir>/report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    start = time.perf_counter()
    path = report(args.dir, args.data, args.out, top=args.top)  # progress: a bar, or lines in a log
    print(f"report written to {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
