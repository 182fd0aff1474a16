"""The flags of python -m lowrank.train: the names transformers / peft users carry over are aliases
that give the same TrainConfig as lowrank's own flags, on the command line and as TOML keys."""

import pytest

from lowrank import ConfigError
from lowrank.train.config import TrainConfig, read_toml
from lowrank.train.flags import build_parser, config_from_args

RUN = ["--model", "m", "--data", "d", "--output", "o"]

# alias flag -> (lowrank's flag, a value that is not the default)
ALIASES = {
    "--lora-alpha": ("--alpha", "7.5"),
    "--lora-dropout": ("--dropout", "0.125"),
    "--num-train-epochs": ("--epochs", "2.5"),
    "--per-device-train-batch-size": ("--batch-size", "3"),
    "--gradient-accumulation-steps": ("--grad-accum", "5"),
    "--learning-rate": ("--lr", "3e-5"),
    "--lr-scheduler-type": ("--lr-scheduler", "linear"),
    "--save-steps": ("--save-every", "11"),
    "--eval-steps": ("--eval-every", "13"),
    "--lora-r": ("--r", "6"),
    "--bf16": ("--dtype", "bfloat16"),
    "--fp16": ("--dtype", "float16"),
}


def flags(*argv) -> TrainConfig:
    return config_from_args(vars(build_parser().parse_args([*RUN, *argv])))


def toml(tmp_path, text: str) -> TrainConfig:
    path = tmp_path / "run.toml"
    path.write_text(text + "\n")
    return TrainConfig(model="m", data="d", output="o", **read_toml(path))


@pytest.mark.parametrize("alias", list(ALIASES))
def test_alias_flags_give_the_canonical_config(alias, tmp_path):
    canonical, value = ALIASES[alias]
    expected = flags(canonical, value)
    assert expected != TrainConfig(model="m", data="d", output="o")  # the value is not the default
    switch = alias in ("--bf16", "--fp16")
    assert flags(*([alias] if switch else [alias, value])) == expected
    # transformers' scripts spell flags with underscores (--per_device_train_batch_size)
    assert flags(*([alias.replace("-", "_").replace("__", "--", 1)] + ([] if switch else [value]))) == expected
    key = alias[2:].replace("-", "_")
    toml_value = "true" if switch else (f'"{value}"' if not value[0].isdigit() else value)
    assert toml(tmp_path, f"{key} = {toml_value}") == expected


def test_precision_switches_follow_transformers():
    assert flags("--bf16", "--dtype", "float32").dtype == "float32"  # the last flag wins
    assert flags("--dtype", "float32", "--fp16").dtype == "float16"


def test_precision_switches_in_toml(tmp_path):
    assert toml(tmp_path, "bf16 = true\nfp16 = false").dtype == "bfloat16"
    # As in TrainingArguments: neither switch on (and no dtype) trains in fp32, not bf16 autocast.
    assert toml(tmp_path, "bf16 = false\nfp16 = false").dtype == "float32"
    assert toml(tmp_path, 'bf16 = false\ndtype = "float16"').dtype == "float16"
    with pytest.raises(ConfigError, match="keys 'bf16' and 'fp16' both set dtype"):
        toml(tmp_path, "bf16 = true\nfp16 = true")
    with pytest.raises(ConfigError, match="key 'bf16' = 1: expected true or false"):
        toml(tmp_path, "bf16 = 1")


def test_an_alias_and_its_field_in_one_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"run.toml: keys 'lr' and 'learning_rate' both set lr; keep one"):
        toml(tmp_path, "lr = 1e-4\nlearning_rate = 2e-4")


def test_alias_toml_keys_mixed_with_own_keys(tmp_path):
    cfg = toml(tmp_path, "num_train_epochs = 1\nper-device-train-batch-size = 2\nlora_alpha = 32\n"
                         'lr_scheduler_type = "constant"\nlogging_steps = 5\nreport_to = "none"\nr = 16')
    assert (cfg.epochs, cfg.batch_size, cfg.alpha, cfg.lr_scheduler, cfg.logging_steps, cfg.r) == \
        (1.0, 2, 32.0, "constant", 5, 16)
    assert isinstance(cfg.epochs, float) and cfg.report_to == ["none"]


def test_report_to_forms():
    assert flags("--report-to", "tensorboard", "wandb").report_to == ["tensorboard", "wandb"]
    assert TrainConfig(model="m", data="d", output="o", report_to="tensorboard,wandb").report_to == \
        ["tensorboard", "wandb"]


def test_help_lists_aliases_but_not_underscore_spellings(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--lr LR, --learning-rate LR" in out and "--bf16" in out
    assert "--per_device_train_batch_size" not in out
