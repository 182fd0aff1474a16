"""`python -m lowrank.plot`: the loss curves of one or several training runs, side by side.

    python -m lowrank.plot runs/a runs/b --output compare.png

Each RUN_DIR is a `python -m lowrank.train` output folder (its metrics.jsonl is read); each gets
a panel with its train and eval loss against step, on a shared loss axis. Needs matplotlib
(`pip install "lowrank[plot]"`). Only parses: the drawing is lowrank.train.plot.plot_runs.
"""

from __future__ import annotations

import sys

from .errors import CommandLineParser


def main(argv=None) -> int:
    p = CommandLineParser(prog="python -m lowrank.plot", description="Draw train and eval loss against step for "
                "one or several lowrank.train output folders, side by side, into a PNG.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of python -m lowrank.train")
    p.add_argument("--output", default="loss.png", help="the PNG to write (default: loss.png)")
    args = p.parse_args(argv)
    from .errors import LowrankError
    from .train.plot import plot_runs

    try:
        path = plot_runs(args.runs, args.output)
    except LowrankError as e:
        print(f"lowrank: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
