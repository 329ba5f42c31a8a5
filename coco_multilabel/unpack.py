"""Unpack the challenge archive: ``python -m coco_multilabel.unpack ms-coco.zip data/ms-coco``.

``make data ZIP=ms-coco.zip`` runs it, then ``make check-data``. Unpacked into a temporary folder
renamed into place (``data/archive.py``): never a half-filled data root.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from coco_multilabel.cli import report_user_errors
from coco_multilabel.data.archive import unpack


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, help="the challenge's ms-coco.zip")
    parser.add_argument("destination", type=Path, help="the data root to create, e.g. data/ms-coco")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    unpack(args.archive, args.destination, progress=sys.stderr.isatty())


if __name__ == "__main__":
    main()
