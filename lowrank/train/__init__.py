"""Training: the settings, the loop and what it writes.

- `config.py`: `TrainConfig`, its checks and TOML;
- `loop.py`: `finetune(config)`, the loop a reader follows top to bottom (`build_run`,
  `train_step`, `evaluate`);
- `prepare.py`: what the loop needs before step 0 (the method applied, examples, rows);
- `loss.py`, `schedule.py`, `distributed.py`, `state.py` (checkpoints and exact resume);
- `export.py`: `export_model`, a fine-tune as a complete Hugging Face folder;
- `reporting.py`, `trackers.py`, `plot.py`: what a run prints, TensorBoard / wandb, loss curves;
- `stopping.py` (Ctrl-C / SIGTERM), `neftune.py` (embedding noise);
- `quickstart.py`: the tiny model built on the spot for `--quickstart`;
- `__main__.py`: the command line, `python -m lowrank.train`.
"""

from .config import TrainConfig, check_config, read_toml
from .loop import NonFiniteLossError, TrainResult, finetune
from .export import export_model
from .loss import count_trainable_tokens, masked_cross_entropy

__all__ = ["TrainConfig", "check_config", "read_toml", "finetune", "export_model", "TrainResult",
           "NonFiniteLossError", "masked_cross_entropy", "count_trainable_tokens"]
