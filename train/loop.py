"""The training run: data -> model (+ EMA) -> timm optimizer / scheduler -> DeepSpeed engine (compiled) -> epochs of
training and evaluation -> checkpoints.

Determinism. Every micro-step reseeds Python's, NumPy's and torch's RNGs from (seed, epoch, micro-step, rank)
before mixup / dropout / drop-path draw from them, data samples are pure functions of (seed, epoch, index), and
the sample order is a DistributedSampler(seed, epoch). So an epoch is a function of the state at its start: a run
killed at any point and resumed from its last checkpoint (saved at epoch ends) replays the same losses on CPU.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import (TrainerState, check_resumable, check_same_model, clear_checkpoints, find_checkpoint,
                         load_checkpoint, save_checkpoint)
from .config import ConfigError, RunConfig, save_config
from .data import (DataBundle, build_data, check_data_paths, mix_seed, model_data_config, steps_per_epoch,
                   train_loader, updates_per_epoch, val_loader)
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, init_distributed, launch_rank_and_world
from .engine import (EngineParts, build_deepspeed_config, check_init_checkpoint, create_losses, create_model,
                     create_optimizer, create_scheduler, forward_logits, gathered_params, initialize_engine,
                     resolved_lr, shape_model, train_micro_step)
from .lock import OutputDirLock
from .logs import RunLogger, format_seconds

__all__ = ["RunResult", "Preflight", "run", "preflight", "seed_step", "evaluate"]


@dataclass
class RunResult:
    out_dir: str
    history: list
    best_top1: float | None
    best_epoch: int | None
    train_time_s: float
    num_params: int
    rank: int


def seed_step(*parts: int) -> None:
    """Seed Python, NumPy and torch for one step from integers (the same values give the same draws)."""
    seed = mix_seed(*parts)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _num_classes(cfg: RunConfig) -> int:
    """From the config, or the data set (canvas: 10 digits; ImageFolder: one class per sub-folder)."""
    if cfg.data.num_classes is not None:
        return cfg.data.num_classes
    if cfg.data.kind == "canvas":
        return 10
    folder = os.path.join(os.path.abspath(os.path.expanduser(cfg.data.root)), cfg.data.train_split)
    return sum(1 for entry in os.scandir(folder) if entry.is_dir())


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(forward, loader, device: torch.device, batch_size: int, num_batches: int) -> dict:
    """Top-1 / top-5 / mean loss over a sharded loader, summed over ranks.

    Every rank runs exactly ``num_batches`` forwards of ``batch_size`` images (short batches and missing batches
    are padded and masked out), so compiled graphs see one shape and ZeRO-3's collective gathers stay in step.
    """
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    template = None
    batches = iter(loader)
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is not None:
            images, targets = batch
            template = images
        else:
            images = torch.zeros_like(template) if template is not None else None
            targets = torch.zeros(0, dtype=torch.long)
        if images is None:
            raise RuntimeError("evaluate: this rank has no validation images to shape its padding batches")
        valid = targets.shape[0]
        if valid < batch_size:
            pad = batch_size - images.shape[0]
            images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])]) if pad > 0 else images
        logits = forward(images.to(device, non_blocking=True))[:valid].float().cpu()
        if valid == 0:
            continue
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        sums += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
                              torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item(), valid],
                             dtype=torch.float64)
    sums = all_reduce_sum(sums)
    count = max(sums[3].item(), 1.0)
    return {"top1": 100.0 * sums[0].item() / count, "top5": 100.0 * sums[1].item() / count,
            "loss": sums[2].item() / count, "count": int(sums[3].item())}


def _eval_batches(length: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(length / world_size) / batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def _train_one_epoch(epoch: int, cfg: RunConfig, parts: EngineParts, ema, bundle, dist: DistInfo, mixup, loss_fn,
                     state: TrainerState, logger: RunLogger, timing: dict) -> dict:
    engine, t = parts.engine, cfg.train
    engine.train()
    micro_steps = steps_per_epoch(bundle, cfg, dist.world_size)
    updates = micro_steps // t.grad_accum
    loader = train_loader(bundle, cfg, dist.rank, dist.world_size, epoch)
    logger.start_epoch(epoch, t.epochs, updates)
    interval_loss = torch.zeros((), dtype=torch.float32, device=dist.device)   # summed on device, read at intervals
    interval_micro, interval_data, epoch_loss, epoch_micro, images_seen = 0, 0.0, 0.0, 0, 0
    epoch_start = interval_start = fetch_start = time.perf_counter()
    for micro, (images, targets) in enumerate(loader):
        if micro >= micro_steps:
            break
        interval_data += time.perf_counter() - fetch_start          # time spent waiting for this batch
        seed_step(t.seed, 2, epoch, micro, dist.rank)
        images = images.to(dist.device, non_blocking=True)
        targets = targets.to(dist.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        loss = train_micro_step(engine, images, targets, loss_fn, cfg)
        interval_loss += loss.float()
        interval_micro += 1
        images_seen += images.shape[0]
        if (micro + 1) % t.grad_accum == 0:
            state.global_step += 1
            parts.scheduler.step_update(state.global_step)
            if ema is not None:
                with gathered_params(engine, parts.zero_stage):
                    ema.update(engine.module, step=state.global_step)
            logger.advance()
            update_in_epoch = (micro + 1) // t.grad_accum
            if state.global_step % t.log_interval == 0 or update_in_epoch == updates:
                local = (interval_loss / interval_micro).item()
                mean = all_reduce_mean(interval_loss / interval_micro).item()
                epoch_loss += mean * interval_micro
                epoch_micro += interval_micro
                elapsed = time.perf_counter() - interval_start
                timing["updates"] += interval_micro / t.grad_accum
                timing["seconds"] += elapsed
                remaining = (t.epochs - epoch) * updates - update_in_epoch
                eta = remaining * timing["seconds"] / max(timing["updates"], 1e-9)
                logger.interval(epoch=epoch, epochs=t.epochs, step=state.global_step, step_in_epoch=update_in_epoch,
                                steps_in_epoch=updates, loss=mean, local_loss=local,
                                lr=parts.optimizer.param_groups[0]["lr"],
                                img_per_s=interval_micro * t.batch_size * dist.world_size / max(elapsed, 1e-9),
                                data_ms=1e3 * interval_data / interval_micro, eta_s=eta)
                interval_loss.zero_()
                interval_micro, interval_data, interval_start = 0, 0.0, time.perf_counter()
        fetch_start = time.perf_counter()
    logger.end_epoch()
    seconds = time.perf_counter() - epoch_start
    return {"train_loss": epoch_loss / max(epoch_micro, 1), "lr": parts.optimizer.param_groups[0]["lr"],
            "epoch_time_s": seconds, "img_per_s": images_seen * dist.world_size / max(seconds, 1e-9)}


def _evaluate_all(cfg: RunConfig, parts: EngineParts, ema, bundle, dist: DistInfo) -> dict:
    batch = cfg.train.eval_batch_size or cfg.train.batch_size
    loader = val_loader(bundle, cfg, dist.rank, dist.world_size)
    num_batches = _eval_batches(len(bundle.val_set), dist.world_size, batch)
    engine = parts.engine
    engine.eval()
    result = evaluate(lambda x: forward_logits(engine, x, cfg), loader, dist.device, batch, num_batches)
    row = {"val_loss": result["loss"], "top1": result["top1"], "top5": result["top5"],
           "ema_top1": None, "ema_top5": None}
    if ema is not None:
        amp = cfg.train.precision == "amp_bf16"

        def ema_forward(x):
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=amp):
                return ema.module(x)

        ema.module.eval()
        ema_result = evaluate(ema_forward, val_loader(bundle, cfg, dist.rank, dist.world_size), dist.device, batch,
                              num_batches)
        row.update(ema_top1=ema_result["top1"], ema_top5=ema_result["top5"])
    engine.train()
    return row


@dataclass
class Preflight:
    """What :func:`preflight` checked and built: the checkpoint to resume (root, tag) or None, the data sets."""

    found: tuple[str, str] | None
    bundle: DataBundle
    num_classes: int


def preflight(cfg: RunConfig) -> Preflight:
    """Everything that can be checked before a process group starts or a file is written, in one pass: the data
    directories, the checkpoint to resume (found, partitioned like this run, holding this run's model), the model
    (``model.name`` registered, ``model.kwargs`` accepted: built on the meta device), ``model.init_checkpoint``
    (present, its tensors fit), the DeepSpeed config (file present, keys known to DeepSpeed) and the batch against
    the training set. Raises ConfigError, FileNotFoundError or CheckpointError naming the problem."""
    check_data_paths(cfg)
    found = find_checkpoint(cfg.resume, os.path.abspath(cfg.output.dir))
    _, world_size = launch_rank_and_world()
    ds_config = build_deepspeed_config(cfg, world_size)
    num_classes = _num_classes(cfg)
    model = shape_model(cfg, num_classes)
    check_init_checkpoint(cfg, model)
    if found is not None:
        check_resumable(*found, world_size=world_size, zero_stage=ds_config["zero_optimization"]["stage"],
                        precision=cfg.train.precision)
        check_same_model(*found, model)
    bundle = build_data(cfg, model_data_config(model))
    steps_per_epoch(bundle, cfg, world_size)
    return Preflight(found, bundle, num_classes)


def run(cfg: RunConfig, local_rank: int | None = None, checked: Preflight | None = None) -> RunResult:
    """Train (and evaluate, checkpoint) as ``cfg`` says. Every process of the job calls this.

    ``checked``: the result of :func:`preflight` on ``cfg`` (made here when not given). Rank 0 then takes the output
    directory's lock (:class:`~dartmamba_train.lock.OutputDirLock`) for the whole run, before anything in it is
    written or removed; a second run into the same directory stops there.
    """
    checked = checked or preflight(cfg)
    rank, _ = launch_rank_and_world()
    lock = OutputDirLock(cfg.output.dir).acquire() if rank == 0 else None
    try:
        return _run(cfg, local_rank, checked)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: RunConfig, local_rank: int | None, checked: Preflight) -> RunResult:
    found, bundle = checked.found, checked.bundle
    out_dir = os.path.abspath(cfg.output.dir)
    dist = init_distributed(local_rank)
    t = cfg.train
    ds_config = build_deepspeed_config(cfg, dist.world_size)
    seed_step(t.seed, 1)
    model = create_model(cfg, checked.num_classes)
    num_params = sum(p.numel() for p in model.parameters())
    ema = None
    if t.ema.enabled:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.ema.decay, use_warmup=t.ema.warmup, device=dist.device)
    optimizer = create_optimizer(cfg, model, dist.world_size)
    scheduler = create_scheduler(cfg, optimizer, updates_per_epoch(bundle, cfg, dist.world_size))
    parts = initialize_engine(cfg, model, optimizer, scheduler, ds_config)
    mixup, loss_fn = create_losses(cfg, bundle.num_classes)

    state = TrainerState(world_size=dist.world_size, zero_stage=parts.zero_stage, precision=t.precision)
    if found is not None:
        state = load_checkpoint(parts, ema, *found, dist, t.precision)
        scheduler.step_update(state.global_step)
    cleared = False
    if dist.is_main:                       # the run's files change only once it is sure to start
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
        cleared = found is None and clear_checkpoints(out_dir)
    barrier()
    logger = RunLogger(out_dir, dist.rank, progress_bar=cfg.output.progress_bar, tensorboard=cfg.output.tensorboard,
                       rank_log=cfg.output.rank_log, resume_step=state.global_step if found else None,
                       history=state.history)
    if cleared:
        logger.info(f"fresh run: removed the checkpoints of a previous run in {out_dir} (resume=auto continues a run)")
    if found is not None:
        logger.info(f"resumed from {os.path.join(*found)} (epoch {state.epoch}, update {state.global_step})")
    logger.info(f"{cfg.model.name}: {num_params / 1e6:.2f} M parameters, {dist.world_size} process(es), ZeRO stage "
                f"{parts.zero_stage}, {t.precision}, compile {parts.compile_scope or 'off'}; global batch "
                f"{t.batch_size * t.grad_accum * dist.world_size}, peak lr {resolved_lr(cfg, dist.world_size):.3e}; "
                f"{len(bundle.train_set)} train / {len(bundle.val_set)} val images; outputs in {out_dir}")
    if dist.threads is not None:
        logger.info(f"threads: {dist.threads.describe()}")
    if dist.allocator is not None:
        logger.info(f"allocator: {dist.allocator}")

    timing = {"updates": 0.0, "seconds": 0.0}
    start = time.perf_counter()
    try:
        for epoch in range(state.epoch, t.epochs):
            row = {"epoch": epoch + 1}
            row.update(_train_one_epoch(epoch, cfg, parts, ema, bundle, dist, mixup, loss_fn, state, logger, timing))
            last = epoch + 1 == t.epochs
            if (epoch + 1) % t.eval_interval == 0 or last:
                row.update(_evaluate_all(cfg, parts, ema, bundle, dist))
            else:
                row.update(val_loss=None, top1=None, top5=None, ema_top1=None, ema_top5=None)
            row["step"] = state.global_step
            state.epoch = epoch + 1
            state.history.append(row)
            metric = row["top1"]
            is_best = metric is not None and (state.best_metric is None or metric > state.best_metric)
            if is_best:
                state.best_metric, state.best_epoch = metric, epoch
            logger.epoch_summary(state.history)
            if (epoch + 1) % t.save_interval == 0 or last:
                save_checkpoint(parts, ema, state, out_dir, dist, is_best=is_best, keep_last=t.keep_last)
    finally:
        logger.close()
    seconds = time.perf_counter() - start
    best = "n/a" if state.best_metric is None else f"{state.best_metric:.2f} (epoch {state.best_epoch + 1})"
    logger.info(f"finished in {format_seconds(seconds)}; best top-1 {best}; outputs in {out_dir}")
    return RunResult(out_dir=out_dir, history=state.history, best_top1=state.best_metric, best_epoch=state.best_epoch,
                     train_time_s=seconds, num_params=num_params, rank=dist.rank)
