"""Module-list settings take the same forms everywhere: a list, a comma string or "all-linear",
from Python (TrainConfig, LoraConfig, FreezeConfig), from TOML and from flags; each form adapts
the same modules as the plain list does."""

import pytest

import lowrank
from lowrank import ConfigError
from lowrank.adapters.freeze import FreezeConfig, apply_freeze
from lowrank.adapters.lora import LoraConfig, apply_lora, lora_modules
from lowrank.train.config import TrainConfig, read_toml
from lowrank.train.flags import build_parser, config_from_args
from lowrank.train.prepare import apply_method

RUN = dict(model="m", data="d", output="o")


def adapted(folder, cfg: TrainConfig) -> set[str]:
    model = lowrank.load_model(folder)
    apply_method(model, cfg)
    return {p for p, _ in lora_modules(model)}


def flags(*argv) -> TrainConfig:
    args = vars(build_parser().parse_args(["--model", "m", "--data", "d", "--output", "o", *argv]))
    return config_from_args(args)


def toml(tmp_path, line: str) -> TrainConfig:
    path = tmp_path / "run.toml"
    path.write_text(line + "\n")
    return TrainConfig(**RUN, **read_toml(path))


def test_target_module_forms_adapt_the_same_modules(untied, tmp_path):
    folder, _ = untied
    listed = adapted(folder, TrainConfig(**RUN, target_modules=["q_proj", "v_proj"]))
    assert listed and {p.rsplit(".", 1)[-1] for p in listed} == {"q_proj", "v_proj"}
    for cfg in (TrainConfig(**RUN, target_modules="q_proj, v_proj"),
                TrainConfig(**RUN, target_modules="q_proj,v_proj"),
                toml(tmp_path, 'target_modules = "q_proj,v_proj"'),
                toml(tmp_path, 'target_modules = ["q_proj", "v_proj"]'),
                flags("--target-modules", "q_proj,v_proj"),
                flags("--target-modules", "q_proj", "v_proj")):
        assert cfg.target_modules == ["q_proj", "v_proj"]
        assert adapted(folder, cfg) == listed

    all_linear = adapted(folder, TrainConfig(**RUN, target_modules="all-linear"))
    model = apply_lora(lowrank.load_model(folder), LoraConfig(target_modules="all-linear"))
    assert all_linear == {p for p, _ in lora_modules(model)}
    assert {p.rsplit(".", 1)[-1] for p in all_linear} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"}
    for cfg in (toml(tmp_path, 'target_modules = "all-linear"'), flags("--target-modules", "all-linear")):
        assert cfg.target_modules == ["all-linear"] and adapted(folder, cfg) == all_linear


def test_lora_config_forms(untied):
    folder, _ = untied
    assert LoraConfig(target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]
    assert LoraConfig(target_modules="k_proj").target_modules == ["k_proj"]
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraConfig(modules_to_save="lm_head").modules_to_save == ["lm_head"]
    regex = r"model\.layers\.1\.self_attn\.(q|v)_proj"  # not a name list: a regex, as PEFT reads it
    assert LoraConfig(target_modules=regex).target_modules == regex
    model = apply_lora(lowrank.load_model(folder), LoraConfig(target_modules=regex))
    assert {p for p, _ in lora_modules(model)} == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    with pytest.raises(ConfigError, match="modules_to_save"):
        LoraConfig(modules_to_save="all-linear")


def test_freeze_module_forms(untied):
    folder, _ = untied
    trained = []
    for modules in (["mlp", "lm_head"], "mlp, lm_head", "mlp,lm_head"):
        model = lowrank.load_model(folder)
        apply_freeze(model, FreezeConfig(trainable_layers=1, trainable_modules=modules))
        trained.append({n for n, p in model.named_parameters() if p.requires_grad})
    assert trained[0] and trained[0] == trained[1] == trained[2]
    assert TrainConfig(**RUN, trainable_modules="mlp, lm_head").trainable_modules == ["mlp", "lm_head"]


def test_bad_module_lists_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="target_modules"):
        TrainConfig(**RUN, target_modules="q_proj|v_proj")  # a regex: LoraConfig takes it, TrainConfig a list
    with pytest.raises(ConfigError, match="target_modules"):
        toml(tmp_path, "target_modules = 3")


def test_data_cache_flags(tmp_path):
    assert flags().data_cache == "auto"
    assert flags("--data-cache", "/tmp/c").data_cache == "/tmp/c"
    assert flags("--no-data-cache").data_cache == "off" == toml(tmp_path, 'data_cache = "off"').data_cache


def test_python_and_cli_default_lora_targets_agree(untied):
    """LoraConfig() from Python, TrainConfig() and the CLI with no --target-modules adapt the same layers."""
    folder, _ = untied
    from_python = {p for p, _ in lora_modules(apply_lora(lowrank.load_model(folder), LoraConfig()))}
    assert from_python == adapted(folder, TrainConfig(**RUN)) == adapted(folder, flags())
    assert {p.rsplit(".", 1)[-1] for p in from_python} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}


@pytest.mark.parametrize("settings,message", [
    (dict(epochs=-0.5), "epochs=-0.5: expected a number >= 0"),
    (dict(epochs=float("nan")), "epochs=nan"),
    (dict(report_to=["tensorbored"]), "report_to=\\['tensorbored'\\]: expected one of none, tensorboard, wandb"),
    (dict(report_to=["none", "wandb"]), "report_to=.*'none' or a list of trackers"),
    (dict(logging_steps=-1), "logging_steps=-1: expected an integer >= 0"),
    (dict(neftune_noise_alpha=0.0), "neftune_noise_alpha=0.0: expected a positive number"),
])
def test_bad_new_settings(settings, message):
    from lowrank.train.config import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(TrainConfig(**RUN, **settings))


def test_enable_thinking_reaches_the_chat_template(tmp_path):
    # from flags and TOML to load_dataset's chat_template_kwargs; unset leaves the template's default
    import dataclasses
    import json

    from tests.conftest import FIXTURES
    from lowrank.data.tokenizer import load_tokenizer
    from lowrank.train.prepare import load_examples

    assert flags("--no-enable-thinking").enable_thinking is False
    assert toml(tmp_path, "enable_thinking = true").enable_thinking is True
    assert TrainConfig(**RUN).enable_thinking is None
    # A template that writes the variable into the trained answer shows what reached it.
    tok = dataclasses.replace(load_tokenizer(FIXTURES / "tokenizers" / "qwen2.5-instruct-tokenizer-json"),
                              chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"
                                            "{% if enable_thinking is defined %}[{{ enable_thinking }}]{% endif %}"
                                            "<|im_end|>")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    for value, shown in ((None, ""), (False, "[False]"), (True, "[True]")):
        cfg = TrainConfig(model="m", data=str(data), output="o", enable_thinking=value)
        (example,), _, _ = load_examples(cfg, tok)
        assert tok.decode(example["input_ids"]) == "qa" + shown + "<|im_end|>"
