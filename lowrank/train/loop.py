"""The training loop: `finetune(TrainConfig(...))`, and the pieces it is made of for research scripts.

Read top to bottom:

1. `build_run(config)` loads the tokenizer, the data and the model, applies the method (LoRA,
   prefix, freeze, full) and builds AdamW over the trainable parameters. Nothing is written yet,
   so a bad model folder, data file or setting fails before the output folder exists.
2. `epoch_batches(run, epoch)` are the epoch's micro-batches, the same on every process;
   `step_share(run, batches, k)` is this process's part of optimizer step k of the epoch.
3. `train_step(run, micro_batches, step)` is one optimizer step.
4. `finetune(config)` runs the steps with metrics, evaluation, checkpoints and resume, then
   saves the adapter (or the whole model for freeze / full).

The loss of a step is normalised by tokens, not micro-batches: each micro-batch contributes its
summed token loss, and the step divides once by the trained tokens of all its micro-batches on
all processes (counted and all-reduced before the backward passes):

    loss_step = sum_k loss_sum_k / n_step,   n_step = sum over micro-batches and ranks of trained tokens

With --objective dpo / orpo / simpo, micro-batches hold chosen / rejected pairs and the step's
loss is the mean over its pairs instead (train/preference.py).

Randomness: every step reseeds torch from (seed, step, rank), so dropout depends on the step
number alone and a resumed run draws exactly what the uninterrupted one drew; the data order of
epoch e is a permutation seeded by seed + e.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist
from ..data.batching import Batches, IndexGroups, batch_sequence
from ..data.examples import example_lengths
from ..models.checkpoint import load_model, save_model
from ..models.decoder import set_mlp_tiles
from ..errors import ConfigError, LowrankError
from ..files import write_atomic
from ..kernels import linear_cross_entropy
from .loss import IGNORE_INDEX, count_trainable_tokens, masked_cross_entropy
from .schedule import lr_at, warmup_steps_for
from .config import TrainConfig, check_config, to_toml
from .neftune import add_neftune, remove_neftune
from .prepare import (apply_method, autocast_dtype_for, check_max_len, forward_autocast, load_examples,
                      load_tokenizer_for, pack_rows)
from .reporting import RunLog, say, start_lines, summary_line, write_loss_plot
from .preference import (PreferenceLoss, build_reference, evaluate_preference, precompute_reference,
                         preference_backward, preference_batches)
from .state import (latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint,
                          trainable_state, truncate_metrics)
from .stopping import Stopped, catch_signals

__all__ = ["TrainConfig", "Run", "TrainResult", "NonFiniteLossError", "finetune", "build_run", "epoch_batches",
           "step_share", "train_step", "evaluate", "causal_lm_loss", "save_trained"]


class NonFiniteLossError(LowrankError):
    """The loss or the gradient became inf / NaN: the run stopped, its last good checkpoint is kept."""


@dataclass
class Run:
    """Everything the steps need; build_run makes it, research scripts may change any part."""

    config: TrainConfig
    model: torch.nn.Module  # the lowrank model, adapters applied
    tokenizer: object
    train_examples: Sequence[dict]  # lowrank.data.examples.Examples from build_run; any list of examples works
    eval_examples: Sequence[dict]
    loss_module: torch.nn.Module  # LossModule(model), wrapped for data parallelism when distributed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast_dtype: torch.dtype | None  # None: no autocast (fp32)
    dist: dist.DistInfo
    pad_id: int
    packed_rows: IndexGroups | None  # with packing: the example indices of each row
    steps_per_epoch: int
    total_steps: int
    warmup: int
    data_reports: list = field(default_factory=list)  # load_dataset's DataReport of each file read
    reference: object = None  # DPO's reference model (train/reference.py); None for the other objectives

    @property
    def device(self) -> torch.device:
        return self.dist.device


@dataclass
class TrainResult:
    output: Path
    adapter: Path  # the PEFT adapter folder, or the whole model for freeze / full
    steps: int
    losses: list[float] = field(default_factory=list)  # per step, of this process's run (after a resume: from there)
    eval_loss: float | None = None
    tokens_per_s: float = 0.0
    peak_mem_mb: float = 0.0
    model: torch.nn.Module | None = None
    tokenizer: object = None


# ---- 1. model, data, optimizer --------------------------------------------------------------------

def build_run(config: TrainConfig, info: dist.DistInfo | None = None) -> Run:
    """Load and set up everything for `config`; writes nothing."""
    cfg = check_config(config)
    info = info or dist.DistInfo(device=dist.pick_device(cfg.device))
    autocast_dtype = autocast_dtype_for(cfg.dtype, info.device)
    tokenizer = load_tokenizer_for(cfg)
    check_max_len(cfg)
    train, evals, reports = load_examples(cfg, tokenizer)  # before the model: bad data fails in seconds
    # Frozen weights are kept in the compute dtype (half the memory under bf16); trained ones in fp32.
    frozen_dtype = autocast_dtype if autocast_dtype is not None and cfg.method != "full" else torch.float32
    model = load_model(cfg.model, dtype=frozen_dtype, device=info.device,
                       quantize=None if cfg.quantize == "none" else cfg.quantize)
    torch.manual_seed(cfg.seed)  # the adapter's initial weights
    apply_method(model, cfg)
    if cfg.neftune_noise_alpha:
        add_neftune(model, cfg.neftune_noise_alpha)
    trainable = list(trainable_state(model).values())
    if not trainable:
        raise ConfigError(f"method={cfg.method!r} left no parameter to train")
    for p in trainable:
        p.data = p.data.float()
    model.model.gradient_checkpointing = cfg.gradient_checkpointing
    set_mlp_tiles(model, cfg.mlp_tiles)
    if cfg.aux_loss_coef > 0:
        if not hasattr(model.config, "aux_loss_coef"):
            raise ConfigError(f"aux_loss_coef={cfg.aux_loss_coef}: {model.config.model_type} has no router "
                              "(the load-balancing loss is for MoE models)")
        model.config.aux_loss_coef = cfg.aux_loss_coef
    model.train()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packed_rows = pack_rows(train, cfg) if cfg.packing else None
    n_micro = math.ceil((len(packed_rows) if cfg.packing else len(train)) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_micro / (cfg.grad_accum * info.world_size))
    # Fractional epochs round up; the epsilon keeps 1.1 * 10 (= 11.000000000000002) at 11 steps.
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch - 1e-9)
    warmup = warmup_steps_for(total, cfg.warmup_steps, cfg.warmup_ratio)

    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.resolved_lr(), betas=(0.9, 0.999),
                                  eps=1e-8)
    scaler = torch.amp.GradScaler(info.device.type) if autocast_dtype == torch.float16 else None
    reference = build_reference(model, cfg)
    loss = LossModule(model, fused=cfg.loss == "fused") if cfg.objective == "sft" else PreferenceLoss(model, cfg, reference)
    run = Run(cfg, model, tokenizer, train, evals, dist.wrap(loss, info), optimizer, scaler, autocast_dtype, info,
              pad_id, packed_rows, steps_per_epoch, total, warmup, reports, reference)
    if cfg.precompute_ref:
        precompute_reference(run)
    return run


# ---- the loss -------------------------------------------------------------------------------------

def causal_lm_loss(model, batch: dict, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, trained tokens) of a batch; labels are aligned with input_ids and shifted here.

    fused: the LM head and cross-entropy in one chunked op on the hidden states (no [B, T, V]
    logits); otherwise full logits and lowrank.train.loss.masked_cross_entropy.
    """
    hidden = model.model(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    if not fused:
        loss_sum, count = masked_cross_entropy(model.lm_head(hidden), batch["labels"])
    else:
        # Position t predicts labels[t + 1]; the last position predicts nothing.
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        weight = model.lm_head.weight
        # The op computes in fp32 itself; autocast would recast its matmuls to half precision.
        with torch.autocast(hidden.device.type, enabled=False):
            loss_sum, count = linear_cross_entropy(hidden.to(weight.dtype), weight, targets, bias=model.lm_head.bias)
    # MoE with aux_loss_coef > 0: the router loss of this forward, weighted by the batch's trained
    # tokens so that the step's division by its token count averages it like the LM loss.
    aux = getattr(model.model, "aux_loss", None)
    if aux is not None:
        loss_sum = loss_sum + aux * count
    return loss_sum, count


class LossModule(torch.nn.Module):
    """`causal_lm_loss` as a module, the unit DistributedDataParallel wraps."""

    def __init__(self, model, fused: bool = True):
        super().__init__()
        self.model, self.fused = model, fused

    def forward(self, batch):
        return causal_lm_loss(self.model, batch, self.fused)


# ---- 2. batches -----------------------------------------------------------------------------------

def epoch_batches(run: Run, epoch: int) -> Batches:
    """The micro-batches of one epoch over all processes, in order (every process builds the same
    plan); each is collated when indexed, so a step makes only its own.

    Packed rows are formed once per run and only their order changes by epoch: packing a fresh
    order each epoch would change the number of rows, hence of steps, from epoch to epoch.
    """
    cfg = run.config
    if cfg.objective != "sft":
        return preference_batches(run, epoch)
    if not cfg.packing:
        return batch_sequence(run.train_examples, cfg.batch_size, run.pad_id, seed=cfg.seed + epoch,
                              shuffle=cfg.shuffle, group_by_length=cfg.group_by_length)
    order = np.arange(len(run.packed_rows))
    if cfg.shuffle:
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(cfg.seed + epoch)).numpy()
    return Batches(run.train_examples, IndexGroups.chunks(order, cfg.batch_size), run.pad_id, run.packed_rows,
                   cfg.max_len)


def step_share(run: Run, batches: list[dict], k: int) -> list[dict]:
    """This process's micro-batches of step k of the epoch.

    Step k takes the next grad_accum * world_size micro-batches; rank r takes every world_size-th
    of them from the r-th on. One process with grad_accum * world_size micro-batches per step
    therefore sees the same micro-batches as world_size processes with grad_accum each. A rank left
    without one (a short last step) gets a copy with no trained token, so it still joins the
    gradient all-reduce while adding nothing.
    """
    per_step = run.config.grad_accum * run.dist.world_size
    share = range(k * per_step, min((k + 1) * per_step, len(batches)))[run.dist.rank::run.dist.world_size]
    mine = [batches[i] for i in share]  # one by one: epoch_batches collates only what is indexed
    if not mine:
        first = batches[k * per_step]
        mine = [dict(first, labels=torch.full_like(first["labels"], IGNORE_INDEX))]
    return mine


# ---- 3. one optimizer step ------------------------------------------------------------------------

def train_step(run: Run, micro_batches: list[dict], step: int) -> dict:
    """Optimizer step `step` (0-based) over this process's micro-batches; returns its metrics
    (loss, lr, grad_norm, tokens, trained_tokens; with a preference objective also pairs and
    rewards/..., logps/..., see preference.py) for the whole step over all processes."""
    cfg, info = run.config, run.dist
    torch.manual_seed((cfg.seed * 1_000_003 + step * 4099 + info.rank) % 2**63)
    lr = lr_at(step, run.total_steps, cfg.resolved_lr(), cfg.lr_scheduler, run.warmup, cfg.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    backward = _sft_backward if cfg.objective == "sft" else preference_backward
    loss, counts = backward(run, micro_batches)

    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and run.scaler is None):
        run.optimizer.zero_grad(set_to_none=True)
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        raise NonFiniteLossError(f"step {step + 1}: {what}; stopped before the update "
                                 f"(lower --lr, or check the data)")
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, **counts}


def _sft_backward(run: Run, micro_batches: list[dict]) -> tuple[float, dict]:
    """The backward passes of an SFT step (gradients left in .grad): (loss, token counts) over all processes."""
    info = run.dist
    # Tokens of the data: step_share's stand-in batch (no trained label) reads none.
    tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches if (b["labels"] != IGNORE_INDEX).any())
    counts = torch.tensor([count_trainable_tokens(micro_batches), tokens], dtype=torch.float64)
    trained, tokens = dist.all_reduce_sum(counts.to(run.device), info).tolist()
    # DDP averages gradients over ranks: scale so the average is sum(loss) / trained tokens of the step.
    scale = info.world_size / max(trained, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for i, batch in enumerate(micro_batches):
        batch = {key: value.to(run.device, non_blocking=True) for key, value in batch.items()}
        with dist.no_sync(run.loss_module, sync=i == len(micro_batches) - 1):
            with forward_autocast(run):  # the forward only (prepare.forward_autocast says why)
                part, _ = run.loss_module(batch)
                loss = part * scale
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        loss_sum += part.detach().double()
    loss = dist.all_reduce_sum(loss_sum, info).item() / max(trained, 1.0)
    return loss, {"tokens": int(tokens), "trained_tokens": int(trained)}


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Token-weighted loss and perplexity over the eval examples (shared out across processes)."""
    cfg, info = run.config, run.dist
    if cfg.objective != "sft":
        return evaluate_preference(run)
    batches = batch_sequence(run.eval_examples, cfg.batch_size, run.pad_id, shuffle=False, packing=cfg.packing,
                             max_len=cfg.max_len)
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    run.model.eval()
    try:
        for batch in batches[info.rank::info.world_size]:
            batch = {key: value.to(run.device) for key, value in batch.items()}
            with forward_autocast(run):
                loss_sum, n = causal_lm_loss(run.model, batch, cfg.loss == "fused")
            totals += torch.stack([loss_sum.double(), n.double()])
    finally:
        run.model.train()
    loss_sum, n = dist.all_reduce_sum(totals, info).tolist()
    loss = loss_sum / max(n, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}


# ---- 4. the whole run ------------------------------------------------------------------------------

def finetune(config: TrainConfig) -> TrainResult:
    """Train as `config` says, with checkpoints, metrics and resume; save the adapter. Under
    torchrun, every process calls this and rank 0 writes."""
    check_config(config)
    info = dist.init_distributed(config.device)
    try:
        return _finetune(build_run(config, info))
    finally:
        dist.shutdown(info)


def _finetune(run: Run) -> TrainResult:
    cfg, info = run.config, run.dist
    out = Path(cfg.output)
    checkpoints = out / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    if latest is not None and not cfg.resume:
        raise ConfigError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it "
                          "or choose another output folder")
    start = 0
    if latest is not None:
        state = load_checkpoint(latest, run.model, run.optimizer, expected=_fingerprint(run))
        start = state["step"]
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])

    # Everything above only reads: bad settings or inputs fail before the output folder is touched.
    metrics_path = out / "metrics.jsonl"
    log = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # The settings as resolved, the method's default learning rate included.
        settings = replace(cfg, lr=cfg.resolved_lr())
        text = to_toml(settings)
        write_atomic(out / "run.toml", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        if start:
            truncate_metrics(metrics_path, start)
        else:
            metrics_path.unlink(missing_ok=True)
        for line in start_lines(run):
            say(line)
        log = RunLog(cfg, out, start, run.total_steps, settings=asdict(settings))
    dist.barrier(info)

    from tqdm.auto import tqdm

    bar = tqdm(total=run.total_steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (info.is_main and cfg.progress))
    losses, evaluated, t_run, tokens_run = [], {}, time.perf_counter(), 0
    batches, batches_epoch, step = None, None, start
    try:
        with catch_signals() as stop:  # Ctrl-C / SIGTERM: finish the step, checkpoint, raise Stopped
            while step < run.total_steps:
                epoch, k = divmod(step, run.steps_per_epoch)
                if epoch != batches_epoch:
                    batches, batches_epoch = epoch_batches(run, epoch), epoch
                t0 = time.perf_counter()
                try:
                    row = train_step(run, step_share(run, batches, k), step)
                except NonFiniteLossError as e:
                    kept = latest_checkpoint(checkpoints)
                    raise NonFiniteLossError(f"{e}; last good checkpoint: {kept or 'none yet'}") from None
                seconds = time.perf_counter() - t0
                step += 1
                tokens_run += row["tokens"]
                losses.append(row["loss"])
                row = {"step": step, **row, "tokens_per_s": row["tokens"] / seconds,
                       "peak_mem_mb": peak_mem_mb(run.device), "epoch": round(epoch + (k + 1) / run.steps_per_epoch, 4)}
                if log:
                    log.train(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if run.eval_examples and (step == run.total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    evaluated = evaluate(run)
                    if log:
                        log.evaluation({"step": step, **evaluated})
                saved = step == run.total_steps or (cfg.save_every and step % cfg.save_every == 0)
                stopping = stop.requested(info)
                if saved or stopping:
                    _save_checkpoint(run, checkpoints, step)
                if stopping and step < run.total_steps:
                    if info.is_main:
                        write_loss_plot(out)
                    raise Stopped(step, stop.signum, checkpoints / f"step-{step}")
    finally:
        bar.close()
        if log:
            log.close()
        remove_neftune(run.model)

    adapter = out / "adapter"
    if info.is_main:
        save_trained(run, adapter)
        write_loss_plot(out)
    dist.barrier(info)
    seconds = time.perf_counter() - t_run
    result = TrainResult(out, adapter, step, losses, evaluated.get("eval_loss"),
                         tokens_run / seconds if losses else 0.0, peak_mem_mb(run.device), run.model, run.tokenizer)
    if info.is_main:
        print(summary_line(result, start, seconds), flush=True)
    return result


def _fingerprint(run: Run) -> dict:
    """What a resumed run must share with the checkpoint for its data position to mean the same batches
    (and, method and quantize, for its trainable parameters to continue on the same model)."""
    cfg = run.config
    return {"method": cfg.method, "quantize": cfg.quantize, "batch_size": cfg.batch_size,
            "micro_batches_per_step": cfg.grad_accum * run.dist.world_size, "seed": cfg.seed,
            "shuffle": cfg.shuffle, "packing": cfg.packing, "group_by_length": cfg.group_by_length,
            "max_len": cfg.max_len, "examples": len(run.train_examples),
            "tokens": (int(example_lengths(run.train_examples).sum()) if cfg.objective == "sft" else
                       sum(map(_example_tokens, run.train_examples))),
            **({"objective": cfg.objective} if cfg.objective != "sft" else {})}


def _example_tokens(example: dict) -> int:
    if "input_ids" in example:
        return len(example["input_ids"])
    return sum(len(side["input_ids"]) for side in example.values())  # a preference pair: chosen, rejected


def _save_checkpoint(run: Run, folder: Path, step: int) -> None:
    if run.dist.is_main:
        epoch, k = divmod(step, run.steps_per_epoch)
        state = {"epoch": epoch, "step_in_epoch": k, "run": _fingerprint(run),
                 "scaler": run.scaler.state_dict() if run.scaler is not None else None}
        # The checkpoint also holds the result so far in its usable form, as transformers'
        # checkpoint-N does: --init-adapter, lowrank.generate and PEFT load it as it is.
        save_checkpoint(folder, step, run.model, run.optimizer, state, usable=lambda d: write_trained(run, d))
        prune_checkpoints(folder, run.config.keep_checkpoints)
    dist.barrier(run.dist)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def write_trained(run: Run, folder) -> None:
    """Write the result into `folder` as it is: a PEFT adapter (lora, prefix), or a whole HF-format
    model with its tokenizer (freeze, full)."""
    folder, cfg = Path(folder), run.config
    if cfg.method in ("lora", "prefix"):
        from ..adapters.peft_format import save_adapter

        save_adapter(run.model, folder, base_model_name_or_path=cfg.model)
        return
    save_model(run.model, folder, dtype=run.model.config.dtype or torch.float32)
    source = Path(cfg.tokenizer or cfg.model)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def save_trained(run: Run, folder) -> Path:
    """The result (write_trained), written beside `folder` and renamed into place."""
    folder = Path(folder)
    if run.config.method in ("lora", "prefix"):
        write_trained(run, folder)  # save_adapter writes each file under a temporary name and the config last
        return folder
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    write_trained(run, partial)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old)
    else:
        partial.rename(folder)
    return folder


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocator peak on GPU, the process's peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; no /proc elsewhere
