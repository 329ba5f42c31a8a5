"""Check a data root before training on it: ``python -m coco_multilabel.check_data DATA [--full]``.

Prints, per problem, how many files have it and the first few (see ``data/checks.py``). Exit code 1
when there is any error, 0 otherwise (warnings are tolerated).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from coco_multilabel.cli import report_user_errors
from coco_multilabel.data.checks import check_data


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "root", type=Path, help="the data root: holds images/train, labels/train, images/test"
    )
    parser.add_argument("--full", action="store_true", help="decode every image (slower, finds more damage)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    findings = check_data(args.root, args.full, progress=True)
    print(findings.report())
    print(f"({time.perf_counter() - start:.1f} s)")
    return 1 if findings.errors else 0


if __name__ == "__main__":
    sys.exit(main())
