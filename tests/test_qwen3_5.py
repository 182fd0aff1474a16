"""Qwen3.5 / Qwen3.6 (dense, MoE) and Qwen3-Next against transformers 5 and PEFT, on tiny random
checkpoints that keep the structure of the real configs in ../shared/fixtures/configs/: both
layer kinds in three layers (2 Gated DeltaNet + 1 full attention, or full, linear, full), odd widths (3 value heads per
key head group in the linear layers, GQA 4/2 with a gated q_proj in the full ones), saved by
transformers in both checkpoint layouts (multimodal `model.language_model.*` beside a tiny
vision tower, and text-only `model.layers.*`)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import TOL, randomize_, real_config

import lowrank

VOCAB = 257
pytestmark = pytest.mark.filterwarnings("ignore:.*lowrank loads the language model only:UserWarning")


def _text(t: dict, layers=("linear_attention", "linear_attention", "full_attention"),
          **overrides) -> dict:
    """A text config shrunk: widths ~48, 2 key heads x 3 value heads each in the linear layers."""
    t = copy.deepcopy(t)
    t.update(num_hidden_layers=len(layers), layer_types=list(layers), vocab_size=VOCAB, hidden_size=48,
             intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=8, linear_value_head_dim=12)
    if "num_experts" in t:
        t.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, shared_expert_intermediate_size=20)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(t.get(key), int):
            t[key] %= VOCAB
    t.pop("dtype", None)
    t.pop("torch_dtype", None)
    t.update(overrides)
    return t


def _multimodal(name: str, **overrides) -> dict:
    d = copy.deepcopy(real_config(name))
    d["text_config"] = _text(d["text_config"], **overrides)
    d["vision_config"].update(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=48)
    return d


def _text_only(name: str, **overrides) -> dict:
    d = real_config(name)
    t = _text(d.get("text_config", d), **overrides)
    if "text_config" in d:  # the text model of a multimodal release, as its own checkpoint
        t["architectures"] = ["Qwen3_5MoeForCausalLM" if "num_experts" in t else "Qwen3_5ForCausalLM"]
        t.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
    return t


CONFIGS = {
    # tied, dense, multimodal layout (Qwen3_5ForConditionalGeneration)
    "qwen3.5-4b": lambda: _multimodal("Qwen3.5-4B"),
    # untied, dense, text-only layout (Qwen3_5ForCausalLM)
    "qwen3.5-27b-text": lambda: _text_only("Qwen3.5-27B"),
    # MoE, multimodal (Qwen3_5MoeForConditionalGeneration); a full layer first, then linear ones
    "qwen3.6-35b-a3b": lambda: _multimodal("Qwen3.6-35B-A3B", layers=("full_attention", "linear_attention",
                                                                       "full_attention")),
    "qwen3.5-35b-a3b-text": lambda: _text_only("Qwen3.5-35B-A3B"),
    # Qwen3-Next: fused in_proj_qkvz / in_proj_ba, the hub's 4.x config, one dense layer
    "qwen3-next": lambda: _text_only("Qwen3-Next-80B-A3B-Instruct.partial", mlp_only_layers=[1]),
}


def _hf_class(config: dict):
    import transformers

    return getattr(transformers, config["architectures"][0])


def _hf_checkpoint(folder, config: dict, seed: int = 0, max_shard_size=None):
    """Build, randomise and save a transformers model of `config`; config.json stays as given
    (`config.5x.json`: what transformers 5 wrote)."""
    from transformers import AutoConfig

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    hf = _hf_class(config)(AutoConfig.from_pretrained(folder))
    randomize_(hf, seed)
    with torch.no_grad():  # A_log: decays of every speed, exp(A_log) in [0.05, 2]
        for n, p in hf.named_parameters():
            if n.endswith("A_log"):
                p.copy_(torch.linspace(-3, 0.7, p.numel()))
    hf.eval().save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (folder / "config.json").rename(folder / "config.5x.json")
    (folder / "config.json").write_text(json.dumps(config))
    return hf


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Widths of ~48: a second intra-op thread only adds a barrier to every tiny op, and on a
    shared machine each barrier can wait for a descheduled thread (measured: 20 ms a linear)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (folder, transformers model of the checkpoint's own class)."""
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp("q35") / name
            built[name] = folder, _hf_checkpoint(folder, CONFIGS[name](),
                                                 max_shard_size="40KB" if name == "qwen3-next" else None)
        return built[name]

    return get


def _ids(B=2, T=13, seed=1):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(hf, ids, **kw):
    return hf(input_ids=ids, **kw).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoint, name):
    folder, hf = checkpoint(name)
    model = lowrank.load_model(folder)
    kinds = [layer.linear for layer in model.model.layers]
    assert True in kinds and False in kinds
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _logits(hf, ids), atol=1e-4, rtol=0)
        keep = mask.bool()
        torch.testing.assert_close(model(ids, attention_mask=mask)[keep],
                                   _logits(hf, ids, attention_mask=mask)[keep], atol=1e-4, rtol=0)


def test_checkpoint_layouts(checkpoint):
    """The multimodal checkpoint holds the text model under model.language_model and a vision
    tower, which is not loaded (with a warning); the text-only one holds model.layers."""
    from safetensors import safe_open

    folder, _ = checkpoint("qwen3.5-4b")
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in keys
    assert any(k.startswith("model.visual.") for k in keys)
    with pytest.warns(UserWarning, match=r"language model only.*model\.visual"):
        model = lowrank.load_model(folder)
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" in model.state_dict()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as Qwen3.5-4B
    folder, _ = checkpoint("qwen3-next")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in index  # sharded, fused projections


def _as_4x(config: dict) -> dict:
    """config.json as transformers 4.x wrote it: rope_theta, rope_scaling, torch_dtype."""
    d = copy.deepcopy(config)
    t = d.get("text_config", d)
    rp = t.pop("rope_parameters", None)
    if rp is not None:
        t["rope_theta"] = rp.pop("rope_theta")
        t["partial_rotary_factor"] = rp.pop("partial_rotary_factor", 0.25)
        t["rope_scaling"] = {"type": "mrope", **{k: v for k, v in rp.items() if k != "rope_type"}} if rp else None
    t["torch_dtype"] = "float32"
    return d


@pytest.mark.parametrize("name", ["qwen3.5-4b", "qwen3-next"])
def test_config_as_transformers_4_and_5_write_it(checkpoint, tmp_path, name):
    folder, hf = checkpoint(name)
    written = json.loads((folder / "config.5x.json").read_text())
    for layout, config in (("5x", written), ("4x", _as_4x(written))):
        copy_dir = tmp_path / layout
        copy_dir.mkdir()
        for f in folder.glob("model*"):
            (copy_dir / f.name).symlink_to(f)
        (copy_dir / "config.json").write_text(json.dumps(config))
        model = lowrank.load_model(copy_dir)
        assert model.config.rotary_dim == 4 and model.config.rope_theta == 1e7
        ids = _ids(seed=3)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), _logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen3.5-4b", "qwen3.6-35b-a3b", "qwen3-next"])
def test_greedy_generation_matches_transformers(checkpoint, name):
    folder, hf = checkpoint(name)
    model = lowrank.load_model(folder)
    prompt = _ids(B=1, T=7, seed=9)
    ours = lowrank.generate(model, prompt, max_new_tokens=10)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_batched_left_padded_generation_matches_transformers(checkpoint):
    """The conv and recurrent states under left padding, then step after step."""
    folder, hf = checkpoint("qwen3.5-27b-text")
    model = lowrank.load_model(folder)
    ids = _ids(B=2, T=9, seed=2)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    ours = lowrank.generate(model, ids, max_new_tokens=8, attention_mask=mask, pad_token_id=0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    assert torch.equal(ours, ref)


def test_packed_rows_match_examples_alone(checkpoint):
    """Two packed rows (the second padded at its end): every example equals the model run on it
    alone, so neither the conv nor the recurrent state leaks across an example's start; and
    the gradients flow as for the examples alone."""
    folder, _ = checkpoint("qwen3.5-4b")
    model = lowrank.load_model(folder)
    weight = model.model.layers[0].linear_attn.in_proj_qkv.weight
    g = torch.Generator().manual_seed(4)
    rows = [[70, 9, 5], [33, 21]]  # lengths; the recurrence runs in chunks of 64
    width = 86
    seqs = [[torch.randint(1, VOCAB, (n,), generator=g) for n in row] for row in rows]
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(seqs):
        at = 0
        for s in row:
            ids[r, at: at + len(s)], pos[r, at: at + len(s)], mask[r, at: at + len(s)] = s, torch.arange(len(s)), 1
            at += len(s)
    packed = model(ids, attention_mask=mask, position_ids=pos)
    up = torch.randn(packed.shape, generator=g)
    (packed * up).sum().backward()
    grad_packed = weight.grad.clone()
    model.zero_grad()
    total = 0
    for r, row in enumerate(seqs):
        at = 0
        for s in row:
            alone = model(s[None])[0]
            torch.testing.assert_close(packed[r, at: at + len(s)], alone, **TOL[torch.float32])
            total = total + (alone * up[r, at: at + len(s)]).sum()
            at += len(s)
    total.backward()
    # a sum over 138 positions x 257 logits: fp32 rounding relative to the gradient's scale
    torch.testing.assert_close(grad_packed, weight.grad, atol=1e-6 * float(weight.grad.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3.5-4b", "qwen3.6-35b-a3b", "qwen3-next"])
def test_save_round_trip(checkpoint, tmp_path, name):
    """save_model writes the checkpoint's own layout back: the same keys (the vision tower copied
    through), and transformers loads it with equal logits."""
    from safetensors import safe_open

    def keys(folder):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
        with safe_open(folder / "model.safetensors", "pt") as f:
            return set(f.keys())

    folder, hf = checkpoint(name)
    model = lowrank.load_model(folder)
    out = lowrank.save_model(model, tmp_path / "saved")
    assert keys(out) == keys(folder)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == model.config.model_type
    again = _hf_class(saved).from_pretrained(out).eval()
    ids = _ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(_logits(again, ids), _logits(hf, ids), atol=1e-5, rtol=0)
    if name == "qwen3.5-4b":
        for k, v in hf.state_dict().items():
            if k.startswith("model.visual."):
                assert torch.equal(again.state_dict()[k], v), k


def test_multi_token_prediction_layers_are_skipped(checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder, hf = checkpoint("qwen3.5-27b-text")
    copy_dir = tmp_path / "mtp"
    shutil.copytree(folder, copy_dir)
    weights = load_file(copy_dir / "model.safetensors")
    weights["mtp.fc.weight"] = torch.randn(5, 7)
    weights["mtp.layers.0.input_layernorm.weight"] = torch.randn(5)
    save_file(weights, str(copy_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"2 tensors beside it \(mtp\.\*\)"):
        model = lowrank.load_model(copy_dir)
    ids = _ids(seed=21)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _logits(hf, ids), atol=1e-4, rtol=0)


BAD = [
    ("qwen3.5-27b-text", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3.5-27b-text", {"attn_output_gate": False}, "attn_output_gate"),
    ("qwen3.5-27b-text", {"linear_num_value_heads": 5}, "linear_num_value_heads"),
    ("qwen3.5-27b-text", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen3.5-27b-text", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e7}},
     "rope_parameters"),
    ("qwen3.5-27b-text", {"mamba_ssm_dtype": "bfloat16"}, "mamba_ssm_dtype"),
    ("qwen3.5-35b-a3b-text", {"num_experts_per_tok": 7}, "num_experts_per_tok"),
    ("qwen3.5-35b-a3b-text", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen3-next", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
]


@pytest.mark.parametrize("name,overrides,key", BAD, ids=[f"{n}-{k}" for n, _, k in BAD])
def test_bad_configs_fail_at_load(tmp_path, name, overrides, key):
    config = {**CONFIGS[name](), **overrides}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(lowrank.CheckpointError) as e:
        lowrank.load_model(tmp_path)
    assert "config.json" in str(e.value) and repr(key) in str(e.value)


def test_multimodal_key_outside_the_language_model_is_refused(checkpoint, tmp_path):
    """A text-layout key in a multimodal checkpoint names no module of it: refused by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = checkpoint("qwen3.5-4b")
    copy_dir = tmp_path / "odd"
    shutil.copytree(folder, copy_dir)
    weights = load_file(copy_dir / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.language_model.layers.0.mlp.up_proj.weight"].clone()
    save_file(weights, str(copy_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(lowrank.CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.up_proj"):
        lowrank.load_model(copy_dir)


# ---- adapters ---------------------------------------------------------------------------

def _lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# Every projection of both layer kinds and of the MLP, by name; PEFT's own "all-linear" on a
# multimodal class would adapt the vision tower too.
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                "in_proj_qkvz", "in_proj_ba", "out_proj", "gate_proj", "up_proj", "down_proj"]


def _targets(model):
    names = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [t for t in TEXT_TARGETS if t in names]


@pytest.mark.parametrize("name", ["qwen3.5-4b", "qwen3-next", "qwen3.6-35b-a3b"])
def test_all_linear_adapts_every_projection_of_both_layer_kinds(checkpoint, name):
    from lowrank.adapters import LoraConfig, apply_lora

    model = apply_lora(lowrank.load_model(checkpoint(name)[0]), LoraConfig(r=2, target_modules="all-linear"))
    adapted = {p.split(".", 3)[3] for p, m in model.named_modules() if hasattr(m, "lora_A")}
    linear = ({"linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"} if name == "qwen3-next" else
              {f"linear_attn.in_proj_{x}" for x in ("qkv", "z", "b", "a")}) | {"linear_attn.out_proj"}
    full = {f"self_attn.{x}_proj" for x in "qkvo"}
    assert linear | full <= adapted
    if name == "qwen3.6-35b-a3b":
        assert {"mlp.experts.5.down_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"} <= adapted
    else:
        assert "mlp.gate_proj" in adapted
    assert not any(p.endswith(("conv1d", "mlp.gate")) for p in adapted)  # the conv and the router stay


def _peft_model(hf, adapter):
    """PEFT's model of the adapter on a copy of the checkpoint's transformers model (the same
    weights as from_pretrained(folder) would give, without reading them again)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(hf), adapter).eval()


# transformers 5 holds the routed experts fused (`experts.gate_up_proj`), and PEFT 0.21 has no
# conversion of per-expert adapters for these model types (its table knows mixtral and qwen2_moe
# only): an adapter on the routed experts round-trips through lowrank, not PEFT. The
# attention, linear-attention, dense-MLP and shared-expert projections go through PEFT.
EXPERTS = (r".*\.(self_attn\.(q|k|v|o)_proj|linear_attn\.(in_proj_\w+|out_proj)"
           r"|mlp\.experts(\.\d+)?\.(gate_proj|up_proj|down_proj))")
ROUND_TRIPS = [("qwen3.5-4b", None), ("qwen3.5-27b-text", None), ("qwen3-next", "no-mlp"),
               ("qwen3.5-35b-a3b-text", EXPERTS)]


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("name,targets", ROUND_TRIPS, ids=[n for n, _ in ROUND_TRIPS])
def test_lora_round_trips_through_peft(checkpoint, tmp_path, name, targets):
    """The adapter's keys are those PEFT uses on the checkpoint's own class: under
    model.language_model for Qwen3_5ForConditionalGeneration, model.layers for the text-only ones."""
    from safetensors import safe_open

    from lowrank.adapters import LoraConfig, apply_lora, load_adapter, save_adapter

    folder, hf = checkpoint(name)
    model = lowrank.load_model(folder)
    if targets in (None, "no-mlp"):
        targets = [t for t in _targets(model) if targets is None or not t.endswith(("gate_proj", "up_proj", "down_proj"))]
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    out = save_adapter(model, tmp_path / "adapter")
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    layers = "base_model.model.model.language_model.layers." if name == "qwen3.5-4b" else \
        "base_model.model.model.layers."
    assert keys and all(k.startswith(layers) for k in keys)
    ids = _ids(B=2, T=9, seed=14)
    with torch.no_grad():
        ours = model(ids)
        if targets is not EXPERTS:
            torch.testing.assert_close(_peft_model(hf, out)(input_ids=ids).logits, ours, atol=1e-4, rtol=0)
        again = load_adapter(lowrank.load_model(folder), out)
        torch.testing.assert_close(again(ids), ours, **TOL[torch.float32])


def test_training_step_matches_transformers_and_peft(checkpoint):
    """One step's loss (padded batch) and every adapter gradient equal PEFT's on transformers, in
    float64: what is compared is the computation, not the rounding of one order of summation."""
    import peft

    from lowrank.adapters import LoraConfig, apply_lora

    folder, hf = checkpoint("qwen3.6-35b-a3b")
    model = lowrank.load_model(folder)
    targets = [t for t in _targets(model) if t not in ("gate_proj", "up_proj", "down_proj")]
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    oracle = copy.deepcopy(hf)
    oracle.set_experts_implementation("eager")  # its grouped_mm takes no float64
    pm = peft.get_peft_model(oracle, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n.replace("base_model.model.", "", 1).replace(".language_model", "").replace(".default", ""): p
              for n, p in pm.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            theirs[n].copy_(p)
    ids = _ids(B=2, T=11, seed=6)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding, as lowrank's batches are
    labels = ids.masked_fill(mask == 0, -100)
    model.train(), pm.train()
    model.double(), pm.double()
    loss = F.cross_entropy(model(ids, attention_mask=mask)[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    # The same loss on transformers' logits: its own loss upcasts to fp32, this test runs in float64.
    ref = F.cross_entropy(pm(input_ids=ids, attention_mask=mask).logits[:, :-1].reshape(-1, VOCAB),
                          labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    ref.backward()
    for n, p in ours.items():
        # Both models still round to fp32 in places (their norms compute in fp32): about 2e-6 of
        # the gradient's scale. In fp32 the order of a sum (one GEMM for q/k/v's x @ A^T, or
        # three) moved the difference from 3e-6 to 2e-5; in float64 it does not move.
        scale = float(theirs[n].grad.abs().max())
        torch.testing.assert_close(p.grad, theirs[n].grad, atol=1e-5 * scale, rtol=1e-4, msg=n)


def test_freeze_by_layer_and_gradient_checkpointing(checkpoint):
    from lowrank.adapters.freeze import FreezeConfig, apply_freeze

    model = lowrank.load_model(checkpoint("qwen3-next")[0])
    apply_freeze(model, FreezeConfig(trainable_layers=[0, 2], trainable_modules=["linear_attn", "self_attn"]))
    trained = {n.split(".")[2] + "." + n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"0.linear_attn", "2.self_attn"}
    ids = _ids(B=2, T=10, seed=8)
    model.train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.model.gradient_checkpointing = ckpt
        _lm_loss(model(ids), ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], **TOL[torch.float32])


def test_prefix_tuning_is_refused(checkpoint):
    from lowrank.adapters.prefix import PrefixConfig, apply_prefix

    model = lowrank.load_model(checkpoint("qwen3.5-27b-text")[0])
    with pytest.raises(lowrank.ConfigError, match="linear-attention.*PEFT 0.21 cannot prefix-tune"):
        apply_prefix(model, PrefixConfig(num_virtual_tokens=3))
    assert all(p.requires_grad for p in model.parameters())
