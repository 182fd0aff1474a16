"""Shared test fixtures: where ../shared is, and the tolerances every numeric test uses."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

# The token cache of every load in the tests (and their subprocesses) goes to a fresh folder,
# never the user's ~/.cache/lowrank.
os.environ["LOWRANK_CACHE"] = tempfile.mkdtemp(prefix="lowrank-test-cache-")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"

# One table of tolerances per dtype (Liger's tests): tight, and stated once.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@pytest.fixture(scope="session", autouse=True)
def _remove_test_cache():
    yield
    import shutil

    shutil.rmtree(os.environ["LOWRANK_CACHE"], ignore_errors=True)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: tests need the shared fixtures beside the checkout")
    return SHARED


# ---- tiny random checkpoints shaped like the real configs -------------------------------

import copy  # noqa: E402
import json  # noqa: E402


def real_config(name: str) -> dict:
    return json.loads((FIXTURES / "configs" / f"{name}.json").read_text())


def shrink(d: dict, layers: int = 2, vocab: int = 257, head_dim: int = 16, intermediate: int = 96) -> dict:
    """Keep a real config's structure (heads, kv heads, biases, tie, rope, norm eps, whether
    head_dim is explicit) and shrink its sizes, in the hub's 4.x layout."""
    d = copy.deepcopy(d)
    heads = d["num_attention_heads"]
    explicit_head_dim = "head_dim" in d and d["head_dim"] * heads != d["hidden_size"]
    d.update(num_hidden_layers=layers, vocab_size=vocab, intermediate_size=intermediate)
    if explicit_head_dim:
        d["head_dim"] = head_dim
        d["hidden_size"] = 64
    else:
        d.pop("head_dim", None)
        d["hidden_size"] = heads * head_dim
    if "max_window_layers" in d:
        d["max_window_layers"] = layers
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(d.get(key), int):
            d[key] = d[key] % vocab
    d["torch_dtype"] = "float32"
    return d


def randomize_(model, seed: int = 0):
    """Fill every parameter with noise: default inits put zeros in biases and ones in norms,
    where a bug would go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def make_hf_checkpoint(folder, config: dict, layout: str = "5.x", max_shard_size=None, seed: int = 0,
                       dtype=torch.float32):
    """Build a random transformers model from `config` (4.x layout), save it with
    save_pretrained and return the transformers model (fp32, eval mode).

    layout "4.x" rewrites config.json the way the hub carries it; "5.x" keeps what
    transformers 5 wrote (rope_parameters, dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    hf_config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    randomize_(model, seed)
    model.eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(folder, **kwargs)
    model.float()
    if layout == "4.x":
        saved = json.loads((folder / "config.json").read_text())
        config = dict(config, torch_dtype=str(dtype).removeprefix("torch."))
        assert "rope_parameters" in saved or "rope_theta" in saved
        (folder / "config.json").write_text(json.dumps(config))
    return model


def make_bnb_checkpoint(dense, folder, **bnb):
    """Quantise the folder `dense` with transformers + bitsandbytes (on the CPU) as users do, save it
    to `folder` with save_pretrained and return the quantised transformers model (eval mode).
    bnb: BitsAndBytesConfig's arguments; the compute dtype is fp32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(**bnb, bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(dense, quantization_config=q, device_map="cpu")
    hf.save_pretrained(folder)
    return hf.eval()


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """Qwen2.5-7B's structure (q/k/v biases, untied head), shrunk: (folder, transformers model),
    built once per test module."""
    folder = tmp_path_factory.mktemp("qwen-untied")
    return folder, make_hf_checkpoint(folder, shrink(real_config("Qwen2.5-7B-Instruct")))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """Qwen2.5-0.5B's structure (tied embeddings), shrunk: (folder, transformers model)."""
    folder = tmp_path_factory.mktemp("qwen-tied")
    return folder, make_hf_checkpoint(folder, shrink(real_config("Qwen2.5-0.5B-Instruct")))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """factory(name, layout="5.x", max_shard_size=None, **config_overrides) -> (folder, hf_model)"""
    counter = iter(range(1000))

    def factory(name: str, layout: str = "5.x", max_shard_size=None, seed: int = 0, dtype=torch.float32,
                **overrides):
        config = shrink(real_config(name))
        config.update(overrides)
        folder = tmp_path / f"{name}-{next(counter)}"
        return folder, make_hf_checkpoint(folder, config, layout, max_shard_size, seed, dtype)

    return factory


# ---- Triton kernels: on a GPU, or under the interpreter in a fresh process ---------------

def triton_status(kernel_module: str, kernel_name: str) -> tuple[bool, bool]:
    """(interpreted, runs_here) for a @triton.jit kernel: whether this process decorated it
    under TRITON_INTERPRET=1, and whether Triton tests can run in this process at all."""
    try:
        import importlib

        from triton.runtime.interpreter import InterpretedFunction

        kernel = getattr(importlib.import_module(kernel_module), kernel_name)
    except ImportError:
        return False, False
    interpreted = isinstance(kernel, InterpretedFunction)
    return interpreted, interpreted or torch.cuda.is_available()


def run_triton_tests_interpreted(test_file: str):
    """Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when a kernel
    module is first imported, and importing lowrank already did that in this process: so a
    file's `test_triton_*` tests run in a fresh pytest with the variable set from the start.
    Fails unless they all pass there (none skipped). The timeout only catches a hang: the
    interpreted gated-delta-rule backward alone took 135-226 s on a loaded 2-core machine."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-k", "test_triton_", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert " passed" in report and "skipped" not in report, report
