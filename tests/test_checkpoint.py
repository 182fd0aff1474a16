"""Every bad model folder raises CheckpointError naming the file and key; never a partial model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowrank
from lowrank import CheckpointError


@pytest.fixture
def good(tiny_checkpoint):
    folder, _ = tiny_checkpoint("Qwen2.5-0.5B-Instruct")
    return folder


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def raises(folder, *fragments):
    with pytest.raises(CheckpointError) as e:
        lowrank.load_model(folder)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    return str(e.value)


def test_missing_folder(tmp_path):
    raises(tmp_path / "nope", "nope", "no such model folder")


def test_a_hub_id_says_lowrank_reads_local_folders():
    message = raises("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct: no such model folder. lowrank reads "
                     "local folders and never downloads",
                     "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir Qwen2.5-0.5B-Instruct")
    assert "\n" not in message


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_dtype_a_model_cannot_compute_in_is_one_config_error(good, dtype):
    with pytest.raises(lowrank.ConfigError, match=rf"dtype={dtype}: a model loads in one of float32, bfloat16"):
        lowrank.load_model(good, dtype=dtype)


def test_missing_config(good):
    (good / "config.json").unlink()
    raises(good, "config.json")


def test_malformed_config(good):
    (good / "config.json").write_text('{"model_type": "qwen2", ')
    raises(good, "config.json", "not valid JSON")


def test_unknown_architecture(good):
    edit_config(good, model_type="gpt_neox")
    raises(good, "config.json", "model_type", "gpt_neox")


def test_missing_and_mistyped_config_keys(good):
    edit_config(good, num_attention_heads=None)
    raises(good, "num_attention_heads", "missing")
    edit_config(good, num_attention_heads="14")
    raises(good, "num_attention_heads", "int")


def test_unsupported_rope_type_in_either_layout(good):
    edit_config(good, rope_parameters={"rope_type": "longrope", "rope_theta": 1e6, "factor": 2.0})
    raises(good, "longrope")
    edit_config(good, rope_parameters=None, rope_scaling={"type": "longrope", "factor": 2.0})
    raises(good, "rope_scaling", "longrope")


def test_sliding_window_in_use_is_refused(good):
    edit_config(good, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    raises(good, "use_sliding_window")


def test_kv_heads_must_divide_heads(good):
    edit_config(good, num_key_value_heads=3)
    raises(good, "num_key_value_heads")


def test_no_weights_and_pickle_is_never_loaded(good):
    (good / "model.safetensors").rename(good / "pytorch_model.bin")
    msg = raises(good, "model.safetensors", "pytorch_model.bin")
    assert "pickle" in msg


def test_missing_tensor(good):
    edit_weights(good, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    raises(good, "model.layers.1.mlp.up_proj.weight", "lacks")


def test_unexpected_tensor(good):
    edit_weights(good, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.randn(3, 3)}))
    raises(good, "model.safetensors", "model.layers.9.mlp.up_proj.weight", "unexpected")


def test_wrong_shape(good):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1].clone()
    edit_weights(good, shrink)
    raises(good, "model.safetensors", "model.layers.0.self_attn.k_proj.weight", "shape")


def test_truncated_file(good):
    path = good / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    raises(good, "model.safetensors")


def test_corrupt_header(good):
    path = good / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00garbage-not-json-at-all-here!!!"
    path.write_bytes(bytes(data))
    raises(good, "model.safetensors")


def test_index_naming_a_missing_shard(tiny_checkpoint):
    folder, _ = tiny_checkpoint("Qwen2.5-0.5B-Instruct", max_shard_size="60KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    raises(folder, "model.safetensors.index.json", shard.name)


def test_corrupt_index(tiny_checkpoint):
    folder, _ = tiny_checkpoint("Qwen2.5-0.5B-Instruct", max_shard_size="60KB")
    (folder / "model.safetensors.index.json").write_text("[1, 2")
    raises(folder, "model.safetensors.index.json")


def test_save_refuses_a_bad_shard_size(good, tmp_path):
    model = lowrank.load_model(good)
    with pytest.raises(lowrank.LowrankError, match="max_shard_size"):
        lowrank.save_model(model, tmp_path / "out", max_shard_size="lots")
    assert not (tmp_path / "out").exists()
