"""`python -m lowrank.train`: the command line of lowrank.train.finetune. It only parses.

    python -m lowrank.train --model DIR --data FILE --output DIR [--method lora|prefix|freeze|full] ...
    python -m lowrank.train --config run.toml [flags that override it]
    python -m lowrank.train --quickstart          # the whole pipeline on a tiny embedded model, on the CPU
    torchrun --nproc_per_node N -m lowrank.train ...   # data-parallel

One flag per TrainConfig field (flags.py). Exit status: 0 done, 1 the loss
diverged (the last good checkpoint is kept), 2 bad flags or inputs (nothing written), 130 / 143
stopped by Ctrl-C / SIGTERM (after a checkpoint, see stopping.py; --resume continues).
Nothing imports this module: the package's function is lowrank.train.finetune.
"""

from __future__ import annotations

import sys

from ..errors import LowrankError
from .config import read_toml
from .flags import build_parser, config_from_args


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_file, quickstart = args.pop("config", None), args.pop("quickstart", False)
    try:
        base = {}
        if quickstart:
            from .quickstart import quickstart_settings

            base = quickstart_settings(args.get("output"))
        if config_file:
            base.update(read_toml(config_file))
        config = config_from_args(args, base)
        if quickstart:
            from .quickstart import run_quickstart

            run_quickstart(config)
        else:
            from .loop import finetune

            finetune(config)
    except LowrankError as e:
        from .loop import NonFiniteLossError

        print(f"lowrank: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLossError) else 2
    except KeyboardInterrupt as e:
        from .stopping import Stopped

        if isinstance(e, Stopped):
            print(f"lowrank: {e}", file=sys.stderr)
            return e.exit_status
        print("lowrank: interrupted; --resume continues from the newest checkpoint, if any", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
