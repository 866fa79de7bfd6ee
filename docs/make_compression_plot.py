"""Token pruning, compression and both, in one figure (docs/compression.md).

    python docs/make_compression_plot.py BASE.csv SLIM.csv -o docs/compression_sweep.png

BASE.csv and SLIM.csv: `apformer sweep` over the same settings for the base weights and for
their compressed version, on the same data and machine, each including a row that prunes
nothing (APFormer: token threshold 1). Writes the PNG (mean Dice against GFLOP and against
ms per slice) and a Markdown table beside it (same name, .md), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_apformer.compress.stacking import UNPRUNED, classify, plot, table
from napari_apformer.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="sweep CSV of the base weights")
    parser.add_argument("compressed", type=Path, help="sweep CSV of the compressed weights")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument(
        "--unpruned",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="settings under which nothing is pruned (default: token_threshold=1)",
    )
    parser.add_argument("--title", default="", help="title of the figure")
    args = parser.parse_args(argv)
    try:
        unpruned = dict(UNPRUNED)
        if args.unpruned:
            unpruned = {}
            for text in args.unpruned:
                name, sep, value = text.partition("=")
                if not sep or not name.strip():
                    raise InputError(f"--unpruned takes NAME=VALUE, got {text!r}")
                unpruned[name.strip()] = value.strip()
        grouped = classify(args.base, args.compressed, unpruned)
        text = table(grouped)
        plot(grouped, args.out, args.title)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out.with_suffix(".md").write_text(
        f"Base: `{args.base}`; compressed: `{args.compressed}`.\n\n{text}\n", encoding="utf-8"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
