"""The settings of a training run: one dataclass, read from TOML, checked before anything runs.

Every field carries its help text; the command line (`python -m lowrank.train`) makes one flag per
field from them (`lora_dropout` -> `--lora-dropout`), and a TOML file (`--config run.toml`) uses
the field names as keys. Precedence: the defaults here < the TOML file < flags. The run writes the
resolved settings to `run.toml` in its output folder, which `--config` reads back.

A field's `aliases` are the names transformers / peft users carry over (`learning_rate` for `lr`):
each is a flag and a TOML key for the same field. `switches` are HF's precision booleans
(`--bf16`, `bf16 = true`), which set `dtype`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters.lora import DEFAULT_TARGETS, module_names
from ..errors import ConfigError
from .schedule import SCHEDULES

METHODS = ("lora", "prefix", "freeze", "full")
# Learning rates that suit each method when none is given (LoRA and P-tuning v2 papers, common SFT practice).
DEFAULT_LR = {"lora": 2e-4, "prefix": 1e-2, "freeze": 2e-5, "full": 1e-5}
ALL_PROJECTIONS = list(DEFAULT_TARGETS)  # LoraConfig's default: one default for Python, TOML and flags
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSSES = ("fused", "plain")
QUANTIZE = ("none", "nf4", "int8")
TRACKERS = ("none", "tensorboard", "wandb")
# transformers' precision booleans: each sets dtype (false for both, and no dtype: float32, as there).
PRECISION_SWITCHES = {"bf16": "bfloat16", "fp16": "float16"}
OBJECTIVES = ("sft", "dpo", "orpo", "simpo")
DPO_LOSSES = ("sigmoid", "ipo")
# beta when none is given: TRL's DPOConfig; the SimPO paper's (TRL's CPOConfig keeps DPO's 0.1 for SimPO too).
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}


def _f(default, help: str, group: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "group": group, **kw})
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig:
    # ---- what to train on what
    model: str = _f("", "Hugging Face-format model folder (config.json + safetensors)", "run", required=True)
    data: str = _f("", "training data: JSON, JSONL, CSV, TSV or Parquet records (alpaca, messages, sharegpt, "
                   "text or input_ids; with --objective dpo|orpo|simpo: prompt / chosen / rejected records)", "run",
                   required=True)
    output: str = _f("", "output folder: adapter/, checkpoints/, metrics.jsonl, run.toml", "run", required=True)
    method: str = _f("lora", f"fine-tuning method: {', '.join(METHODS)}", "run", choices=METHODS)
    quantize: str = _f("none", "store the frozen base's projections quantised as they load: nf4 (QLoRA) or int8 "
                       "(lora and prefix only; a bitsandbytes-quantised folder loads quantised anyway)", "run",
                       choices=QUANTIZE)
    tokenizer: str | None = _f(None, "tokenizer folder (default: the model folder)", "run")
    chat_template: str | None = _f(None, "chat template: 'chatml', 'deepseek', a .jinja file or Jinja source "
                                   "(default: the tokenizer's)", "run")
    # ---- LoRA
    # --lora-r: under torchrun, `--r` is taken as an abbreviation of torchrun's own --rdzv-* / --role flags.
    r: int = _f(8, "LoRA rank (--lora-r is the same flag; use it under torchrun)", "lora", aliases=("lora_r",))
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with --use-rslora)", "lora",
                      aliases=("lora_alpha",))
    dropout: float = _f(0.05, "LoRA dropout on the adapter's input", "lora", aliases=("lora_dropout",))
    target_modules: list = _f(ALL_PROJECTIONS, "module names that get LoRA (names or comma lists; 'all-linear': "
                              "every linear layer of the decoder layers)", "lora")
    use_rslora: bool = _f(False, "rank-stabilised LoRA scaling alpha / sqrt(r)", "lora")
    init_adapter: str | None = _f(None, "start LoRA from this PEFT-format adapter; its config sets r, alpha, targets",
                                  "lora")
    # ---- prefix tuning / P-tuning v2
    num_virtual_tokens: int = _f(20, "prefix length (virtual tokens per layer)", "prefix")
    prefix_projection: bool = _f(False, "train the prefixes through PEFT's two-layer MLP (P-tuning v2)", "prefix")
    # ---- freeze
    trainable_layers: int = _f(2, "freeze: train the last N decoder layers (N < 0: the first |N|), freeze the rest",
                               "freeze")
    trainable_modules: list | None = _f(None, "freeze: train only these parts of those layers (mlp, self_attn, ...) "
                                        "and these modules outside them (lm_head, embed_tokens, norm)", "freeze")
    # ---- data and batches
    max_len: int = _f(1024, "tokens per example (longer ones are cut); the packed row length with --packing", "data")
    batch_size: int = _f(4, "examples (rows with --packing) per micro-batch, per process", "data",
                         aliases=("per_device_train_batch_size",))
    grad_accum: int = _f(1, "micro-batches per optimizer step, per process", "data",
                         aliases=("gradient_accumulation_steps",))
    packing: bool = _f(False, "pack several examples into rows of max_len tokens", "data")
    shuffle: bool = _f(True, "shuffle the examples each epoch (--no-shuffle keeps the file order)", "data")
    group_by_length: bool = _f(False, "batch examples of similar length together (less padding)", "data")
    train_on: str = _f("all_turns", "which assistant turns to train: all_turns or last_turn", "data")
    system: str | None = _f(None, "system prompt for records that carry none", "data")
    enable_thinking: bool | None = _f(None, "the chat template's enable_thinking (Qwen3, Qwen3.5: --no-enable-thinking "
                                      "renders the non-thinking prompt; default: the template's own)", "data")
    replacements: dict = _f({}, "text replacements: {{KEY}} in the data becomes VALUE (flag: --replace KEY=VALUE)",
                            "data", flag="replace")
    eval_data: str | None = _f(None, "evaluation file (same formats as --data)", "data")
    eval_split: float = _f(0.0, "hold out this fraction of --data for evaluation (when no --eval-data)", "data")
    eval_every: int = _f(0, "evaluate every N steps (0: at the end only); needs eval data", "data",
                         aliases=("eval_steps",))
    data_cache: str = _f("auto", "folder of the token cache, tokenised data kept for later runs and ranks ('auto': "
                         "$LOWRANK_CACHE/datasets or ~/.cache/lowrank/datasets; 'off' or --no-data-cache: none)",
                         "data", off="off")
    # ---- preference tuning (docs/preference.md)
    objective: str = _f("sft", "sft: next-token loss on the answers; dpo, orpo, simpo: preference tuning on "
                        "prompt / chosen / rejected records", "preference", choices=OBJECTIVES)
    beta: float | None = _f(None, "dpo, simpo: the temperature beta (default: " +
                            ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BETA.items()) + ")", "preference")
    dpo_loss: str = _f("sigmoid", "dpo: sigmoid (DPO) or ipo (IPO, on length-normalised log-probabilities)",
                       "preference", choices=DPO_LOSSES)
    label_smoothing: float = _f(0.0, "dpo (sigmoid), simpo: assumed probability that a pair's preference is "
                                "flipped (conservative DPO)", "preference")
    orpo_lambda: float = _f(0.1, "orpo: weight of the odds-ratio term added to the chosen answers' NLL",
                            "preference")
    simpo_gamma: float = _f(0.5, "simpo: the target reward margin gamma", "preference")
    precompute_ref: bool = _f(False, "dpo: compute the reference log-probabilities once before training, so no "
                              "reference weights are held (or disabled and re-run) during training", "preference")
    # ---- optimization
    lr: float | None = _f(None, "peak learning rate (default by method: " +
                          ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")", "optim",
                          aliases=("learning_rate",))
    lr_scheduler: str = _f("cosine", f"learning-rate schedule: {', '.join(SCHEDULES)}", "optim", choices=SCHEDULES,
                           aliases=("lr_scheduler_type",))
    warmup_steps: int = _f(0, "linear warmup steps", "optim")
    warmup_ratio: float = _f(0.0, "warmup as a fraction of the run (when --warmup-steps is 0)", "optim")
    min_lr: float = _f(0.0, "the learning rate linear and cosine decay to", "optim")
    weight_decay: float = _f(0.0, "AdamW weight decay (matrices only; not biases, norms or vectors)", "optim")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)", "optim")
    epochs: float = _f(3.0, "passes over the data (when --max-steps is 0); a fraction runs "
                       "ceil(epochs * steps per epoch) steps", "optim", aliases=("num_train_epochs",))
    max_steps: int = _f(0, "optimizer steps to run, cycling the data as needed (0: use --epochs)", "optim")
    seed: int = _f(0, "seed of the adapter init, the data order and dropout", "optim")
    aux_loss_coef: float = _f(0.0, "MoE models: weight of the router load-balancing loss (0: off, as usual "
                              "for fine-tuning)", "optim")
    neftune_noise_alpha: float | None = _f(None, "NEFTune: uniform noise of magnitude alpha / sqrt(seq_len * hidden) "
                                           "on the input embeddings, in training only (5 is the paper's usual value)",
                                           "optim")
    # ---- runtime
    dtype: str = _f("auto", "compute precision: auto (bf16 autocast on GPU, fp16 + loss scaling where bf16 is "
                    "missing, fp32 on CPU), float32, bfloat16, float16", "runtime", choices=DTYPES,
                    switches=PRECISION_SWITCHES)
    device: str = _f("auto", "auto, cpu or cuda (under torchrun: one GPU per process)", "runtime",
                     choices=("auto", "cpu", "cuda"))
    gradient_checkpointing: bool = _f(False, "recompute each layer's activations in backward (less memory)", "runtime")
    mlp_tiles: int = _f(1, "run each MLP over N slices of the tokens, each recomputed in backward: the MLP "
                        "activations of one slice live at a time (less memory at long sequences)", "runtime")
    loss: str = _f("fused", "fused: LM head + cross-entropy without the logits; plain: full logits", "runtime",
                   choices=LOSSES)
    save_every: int = _f(0, "write a checkpoint every N steps (0: only at the end)", "runtime",
                         aliases=("save_steps",))
    keep_checkpoints: int = _f(3, "keep the newest K checkpoints (0: keep all)", "runtime")
    resume: bool = _f(False, "continue from the newest checkpoint in the output folder", "runtime")
    progress: bool = _f(True, "show a progress bar", "runtime")
    # ---- watching a run
    logging_steps: int = _f(0, "print a log line (step, loss, lr, grad norm, tokens/s) every N steps (0: only "
                            "the bar); evaluations are always printed", "logging")
    report_to: list = _f(["none"], f"send the metrics to: {', '.join(TRACKERS)} (several may be given)", "logging",
                         choices=TRACKERS)
    logging_dir: str | None = _f(None, "where the trackers write (default: OUTPUT/runs)", "logging")

    def __post_init__(self):
        # From Python a module list may come as a comma string or "all-linear", as in TOML and flags.
        for name in ("target_modules", "trainable_modules", "report_to"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, coerce(name, getattr(self, name)))
        if self.quantize is None:
            self.quantize = "none"

    def resolved_beta(self) -> float:
        return DEFAULT_BETA.get(self.objective, 0.0) if self.beta is None else self.beta

    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
ALIASES = {alias: name for name, f in FIELDS.items() for alias in f.metadata.get("aliases", ())}


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Refuse impossible settings with a ConfigError naming the setting; returns cfg."""
    def bad(name, expected):
        raise ConfigError(f"{name}={getattr(cfg, name)!r}: expected {expected}")

    for name in ("model", "data", "output"):
        if not getattr(cfg, name):
            raise ConfigError(f"{name} is required (--{name} or `{name} = ...` in the config file)")
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        if "choices" in f.metadata and not all(v in f.metadata["choices"] for v in
                                               (value if isinstance(value, list) else [value])):
            bad(name, f"one of {', '.join(f.metadata['choices'])}")
    if cfg.train_on not in ("all_turns", "last_turn"):
        bad("train_on", "all_turns or last_turn")
    positive = ("r", "num_virtual_tokens", "max_len", "batch_size", "grad_accum", "mlp_tiles")
    for name in positive:
        if getattr(cfg, name) < 1:
            bad(name, "an integer >= 1")
    for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "keep_checkpoints", "logging_steps"):
        if getattr(cfg, name) < 0:
            bad(name, "an integer >= 0")
    if not (math.isfinite(cfg.epochs) and cfg.epochs >= 0):
        bad("epochs", "a number >= 0")
    if cfg.max_len < 2:
        bad("max_len", "at least 2 (one token predicts the next)")
    if cfg.epochs == 0 and cfg.max_steps == 0:
        raise ConfigError("epochs=0 and max_steps=0: nothing to train; set one of them")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        bad("lr", "a positive number")
    for name in ("alpha", "min_lr", "weight_decay", "max_grad_norm", "aux_loss_coef"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            bad(name, "a number >= 0")
    if cfg.min_lr > cfg.resolved_lr():
        raise ConfigError(f"min_lr={cfg.min_lr} is above lr={cfg.resolved_lr()}")
    if not 0.0 <= cfg.dropout < 1.0:
        bad("dropout", "a probability in [0, 1)")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        bad("warmup_ratio", "a fraction in [0, 1)")
    if not 0.0 <= cfg.eval_split < 1.0:
        bad("eval_split", "a fraction in [0, 1)")
    if cfg.eval_data and cfg.eval_split:
        raise ConfigError("eval_data and eval_split both given: use one evaluation source")
    if not cfg.target_modules or not all(isinstance(m, str) and m for m in cfg.target_modules):
        bad("target_modules", "a non-empty list of module names")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.replacements.items()):
        bad("replacements", "a table of strings")
    if cfg.quantize != "none" and cfg.method in ("freeze", "full"):
        raise ConfigError(f"quantize={cfg.quantize!r} with method={cfg.method!r}: a quantised weight cannot be trained; "
                          "use method='lora' (QLoRA) or 'prefix', or load the base unquantised")
    if cfg.neftune_noise_alpha is not None and not (math.isfinite(cfg.neftune_noise_alpha)
                                                    and cfg.neftune_noise_alpha > 0):
        bad("neftune_noise_alpha", "a positive number (leave it unset for no noise)")
    if not cfg.report_to or ("none" in cfg.report_to and len(cfg.report_to) > 1):
        bad("report_to", "'none' or a list of trackers")
    from .trackers import require_trackers

    require_trackers(cfg.report_to)  # an optional extra that is missing: a ConfigError before anything runs
    if cfg.init_adapter and cfg.method != "lora":
        raise ConfigError(f"init_adapter is for method='lora', not {cfg.method!r}")
    if cfg.objective != "sft":
        _check_preference(cfg, bad)
    return cfg


def _check_preference(cfg: TrainConfig, bad) -> None:
    what = f"objective={cfg.objective!r}"
    for name in ("packing", "group_by_length"):
        if getattr(cfg, name):
            raise ConfigError(f"{name} with {what}: preference pairs are batched whole, chosen beside rejected")
    if cfg.aux_loss_coef > 0:
        raise ConfigError(f"aux_loss_coef with {what}: the MoE router loss is for the sft objective")
    if cfg.precompute_ref and cfg.objective != "dpo":
        raise ConfigError(f"precompute_ref with {what}: {cfg.objective} uses no reference model")
    if cfg.objective in DEFAULT_BETA and not (math.isfinite(cfg.resolved_beta()) and cfg.resolved_beta() > 0):
        bad("beta", "a positive number")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        bad("label_smoothing", "a probability in [0, 0.5)")
    if cfg.label_smoothing and cfg.objective == "dpo" and cfg.dpo_loss == "ipo":
        raise ConfigError("label_smoothing with dpo_loss='ipo': smoothing is for the sigmoid loss")
    for name in ("orpo_lambda", "simpo_gamma"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            bad(name, "a number >= 0")


# ---- TOML -------------------------------------------------------------------------------------

def read_toml(path) -> dict:
    """The settings of a TOML file as {field: value}, type-checked; unknown keys are errors."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    out, given, switched_off = {}, {}, False
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in PRECISION_SWITCHES:
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: key {key!r} = {value!r}: expected true or false")
            switched_off |= not value
            if not value:
                continue
            name, value = "dtype", PRECISION_SWITCHES[name]
        name = ALIASES.get(name, name)
        if name not in FIELDS:
            raise ConfigError(f"{path}: unknown key {key!r}; see `python -m lowrank.train --help`")
        if name in given:
            raise ConfigError(f"{path}: keys {given[name]!r} and {key!r} both set {name}; keep one")
        given[name] = key
        try:
            out[name] = coerce(name, value)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if switched_off and "dtype" not in out:
        out["dtype"] = "float32"
    return out


def coerce(name: str, value):
    """`value` as field `name` holds it (int -> float where a float is wanted); ConfigError if it cannot be."""
    kind = FIELDS[name].type
    base = kind.split(" | ")[0]
    if value is None and "None" in kind:
        return None
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base == "str" and isinstance(value, str):
        return value
    if base == "list":
        items = module_names(value)  # a list, a comma string or "all-linear"
        if items == "all-linear":
            return [items]
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return [v.strip() for v in items if v.strip()]
    if base == "dict" and isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"key {name!r} = {value!r}: expected {kind}")


def to_toml(cfg: TrainConfig) -> str:
    """The settings as TOML that read_toml reads back (None values are left out)."""
    lines, tables = [], []
    for name in FIELDS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append(f"\n[{name}]\n" + "".join(f"{_toml_str(k)} = {_toml_str(v)}\n" for k, v in value.items()))
        else:
            lines.append(f"{name} = {_toml_value(value)}\n")
    return "".join(lines) + "".join(tables)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_str(value)


def _toml_str(s: str) -> str:
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    escaped = "".join(c if ord(c) >= 0x20 and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'
