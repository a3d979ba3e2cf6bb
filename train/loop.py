"""The training run: data -> model (+ EMA) -> timm optimizer / scheduler -> DeepSpeed engine (compiled) -> epochs of
training and evaluation -> checkpoints.

Determinism. Every micro-step reseeds Python's, NumPy's and torch's RNGs from (seed, epoch, micro-step, rank)
before mixup / dropout / drop-path draw from them, data samples are pure functions of (seed, epoch, index), and
the sample order is a DistributedSampler(seed, epoch). So an epoch is a function of the state at its start: a run
killed at any point and resumed from its last checkpoint (saved at epoch ends) replays the same losses on CPU.

Preemption (:mod:`.preempt`). SIGTERM / SIGUSR1 set a flag that is read between updates (agreed across ranks without
a device sync); the run then saves a mid-epoch checkpoint holding the epoch's micro-step and running sums, and
exits 75. The resumed epoch starts its sampler past the consumed indices, so it replays the same losses.

Divergence. Every micro-step's loss goes into a device-side sum and a device-side "first non-finite update" flag
(no host sync); both are read at each log interval (and so before every save, which follows an epoch's last
interval). With ``train.nonfinite=stop`` a non-finite interval raises :class:`TrainingDiverged` naming the update,
its learning rate and the last finite checkpoint; with ``skip`` each micro-step's loss is checked on the host and a
non-finite one contributes a zero gradient. Non-finite gradients with a finite loss show up as non-finite weights:
in the next loss, and in ``save_checkpoint``'s check, which refuses to save them.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoint import (NonFiniteWeights, TrainerState, check_fresh_output, check_resumable, check_run_files,
                         check_same_model, find_checkpoint, first_nonfinite, last_checkpoint, load_checkpoint, move_aside,
                         repair_published, save_checkpoint)
from .config import ConfigError, RunConfig, save_config
from .data import (DataBundle, build_data, check_data_paths, mix_seed, model_data_config, steps_per_epoch,
                   train_loader, updates_per_epoch, val_loader)
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, init_distributed, launch_rank_and_world
from .engine import (EngineParts, build_deepspeed_config, check_init_checkpoint, create_losses, create_model,
                     create_optimizer, create_scheduler, forward_logits, gathered_params, initialize_engine,
                     resolved_lr, shape_model, train_micro_step)
from .lock import OutputDirLock
from .logs import RunLogger, format_seconds
from .preempt import (REQUEUE_EXIT_CODE, SIGNALS_ENV, Preempted, PreemptionHandler, StopAgreement, parse_signals,
                      requeue_slurm_job)

__all__ = ["RunResult", "Preflight", "run", "preflight", "seed_step", "evaluate", "TrainingDiverged", "Preempted"]


class TrainingDiverged(RuntimeError):
    """The loss (or the weights) became NaN or inf; nothing non-finite was saved. The CLI exits with status 3."""


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
class _SkipSampler(torch.utils.data.Sampler):
    """The indices of ``sampler`` from position ``start`` on (a resumed epoch's remaining samples)."""

    def __init__(self, sampler, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self):
        return iter(list(self.sampler)[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)


def _loader_from(loader, micro: int):
    """``loader`` (an epoch's, :func:`train_loader`) without its first ``micro`` batches: the same loader on the
    remaining indices of its sampler, so the skipped samples are never loaded."""
    if micro == 0:
        return loader
    return torch.utils.data.DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=_SkipSampler(loader.sampler, micro * loader.batch_size),
        drop_last=loader.drop_last, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn, persistent_workers=False)


def _train_one_epoch(epoch: int, cfg: RunConfig, parts: EngineParts, ema, bundle, dist: DistInfo, mixup, loss_fn,
                     state: TrainerState, logger: RunLogger, timing: dict, stop: StopAgreement | None = None,
                     start_step: int = 0) -> dict:
    """One epoch, or its rest after a mid-epoch checkpoint (``state.micro_in_epoch`` > 0, ``state.epoch_partial``:
    the running sums at the stop). When ``stop`` agrees on a preemption between two updates of the epoch, returns
    ``{"stopped": partial sums}`` at once (the caller saves); at the epoch's last update the epoch finishes."""
    engine, t = parts.engine, cfg.train
    engine.train()
    micro_steps = steps_per_epoch(bundle, cfg, dist.world_size)
    updates = micro_steps // t.grad_accum
    start_micro, partial = state.micro_in_epoch, state.epoch_partial or {}
    loader = _loader_from(train_loader(bundle, cfg, dist.rank, dist.world_size, epoch), start_micro)
    logger.start_epoch(epoch, t.epochs, updates)
    logger.advance(start_micro // t.grad_accum)
    # summed on device, read at intervals
    interval_loss = torch.full((), partial.get("interval_loss", 0.0), dtype=torch.float32, device=dist.device)
    # the first update of the interval whose loss was not finite (-1: none), kept on the device: no host sync
    first_bad = torch.full((), partial.get("first_bad", -1), dtype=torch.int64, device=dist.device)
    lr_of = {}                                          # update -> its learning rate, for the divergence message
    skip = t.nonfinite == "skip"
    interval_micro, interval_used = partial.get("interval_micro", 0), partial.get("interval_used", 0)
    interval_data = 0.0
    epoch_loss, epoch_micro = partial.get("epoch_loss", 0.0), partial.get("epoch_micro", 0)
    images_seen = partial.get("images_seen", 0)
    epoch_start = interval_start = fetch_start = time.perf_counter()
    for micro, (images, targets) in enumerate(loader, start=start_micro):
        if micro >= micro_steps:
            break
        interval_data += time.perf_counter() - fetch_start          # time spent waiting for this batch
        seed_step(t.seed, 2, epoch, micro, dist.rank)
        images = images.to(dist.device, non_blocking=True)
        targets = targets.to(dist.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        update = state.global_step + 1
        lr_of.setdefault(update, parts.optimizer.param_groups[0]["lr"])
        try:
            loss = _skipping_micro_step(engine, images, targets, loss_fn, cfg) if skip else \
                train_micro_step(engine, images, targets, loss_fn, cfg)
        except ValueError as err:      # e.g. the DART tokenizer's "scores must be finite" on diverged weights
            if (bool(torch.isfinite(interval_loss)) and int(first_bad) < 0 and not state.skipped
                    and _weights_finite(engine)):
                raise
            bad = int(first_bad) if int(first_bad) >= 0 else update
            what = (f"{state.skipped} micro-batch(es) skipped for a non-finite loss, then update {update} failed"
                    if state.skipped else f"non-finite loss or weights at update {bad}")
            raise TrainingDiverged(_diverged_message(what, lr_of.get(bad), cfg, f"{type(err).__name__}: {err}")) \
                from err
        if loss is None:               # skipped (train.nonfinite=skip)
            state.skipped += 1
        else:
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), update, first_bad)
            interval_loss += loss.float()
            interval_used += 1
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
                used = interval_used if interval_used else math.nan     # nan: every micro-batch skipped
                local = (interval_loss / used).item()
                mean = all_reduce_mean(interval_loss / used).item()
                if interval_used:
                    epoch_loss += mean * interval_used
                    epoch_micro += interval_used
                elapsed = time.perf_counter() - interval_start
                timing["updates"] += interval_micro / t.grad_accum
                timing["seconds"] += elapsed
                remaining = (t.epochs - epoch) * updates - update_in_epoch
                eta = remaining * timing["seconds"] / max(timing["updates"], 1e-9)
                logger.interval(epoch=epoch, epochs=t.epochs, step=state.global_step, step_in_epoch=update_in_epoch,
                                steps_in_epoch=updates, loss=mean, local_loss=local,
                                lr=parts.optimizer.param_groups[0]["lr"],
                                img_per_s=interval_micro * t.batch_size * dist.world_size / max(elapsed, 1e-9),
                                data_ms=1e3 * interval_data / interval_micro, eta_s=eta, skipped=state.skipped)
                if not math.isfinite(mean) and not skip:
                    bad = int(first_bad) if int(first_bad) >= 0 else state.global_step
                    raise TrainingDiverged(_diverged_message(f"non-finite loss ({mean}) at update {bad}",
                                                             lr_of.get(bad), cfg))
                interval_loss.zero_()
                first_bad.fill_(-1)
                lr_of = {}
                interval_micro, interval_used, interval_data, interval_start = 0, 0, 0.0, time.perf_counter()
            if stop is not None:
                stop.handler.after_update(start_step, state.global_step)
                # the epoch's last update finishes the epoch (evaluation, the epoch's checkpoint) instead
                if update_in_epoch < updates and stop.poll():
                    return {"stopped": {"micro": micro + 1, "interval_loss": interval_loss.item(),
                                        "first_bad": int(first_bad), "interval_micro": interval_micro,
                                        "interval_used": interval_used, "epoch_loss": epoch_loss,
                                        "epoch_micro": epoch_micro, "images_seen": images_seen}}
        fetch_start = time.perf_counter()
    logger.end_epoch()
    seconds = time.perf_counter() - epoch_start
    return {"train_loss": epoch_loss / max(epoch_micro, 1), "lr": parts.optimizer.param_groups[0]["lr"],
            "epoch_time_s": seconds, "img_per_s": images_seen * dist.world_size / max(seconds, 1e-9)}


def _skipping_micro_step(engine, images, targets, loss_fn, cfg: RunConfig) -> torch.Tensor | None:
    """``train.nonfinite=skip``: like ``train_micro_step``, but a micro-batch whose loss is not finite contributes an
    exact zero gradient (the backward runs on ``sum(0 * p)``, which does not touch the NaN graph), so the update
    only carries the optimizer's momentum and weight decay. Costs one host sync per micro-step. Returns the loss,
    or None when skipped."""
    loss = loss_fn(forward_logits(engine, images, cfg), targets)
    if bool(torch.isfinite(loss.detach())):
        engine.backward(loss)
        engine.step()
        return loss.detach()
    zero = sum((p * 0).sum() for p in engine.module.parameters() if p.requires_grad)
    engine.backward(zero)
    engine.step()
    return None


def _weights_finite(engine) -> bool:
    return first_nonfinite({name: p.detach() for name, p in engine.module.named_parameters()}) is None


def _diverged_message(what: str, lr: float | None, cfg: RunConfig, detail: str | None = None) -> str:
    out_dir = os.path.abspath(cfg.output.dir)
    previous = last_checkpoint(out_dir)
    lr_text = "" if lr is None else f" (lr {lr:.3e})"
    where = (f"the last finite checkpoint is {previous} (resume={previous} with a lower optim.lr continues from it)"
             if previous else "no checkpoint was saved")
    return (f"training diverged: {what}{lr_text}{'; ' + detail if detail else ''}; nothing non-finite was saved; "
            f"{where}; train.nonfinite=skip skips such micro-batches instead")


def _save(cfg: RunConfig, parts: EngineParts, ema, state: TrainerState, out_dir: str, dist: DistInfo,
          is_best: bool) -> str:
    try:
        return save_checkpoint(parts, ema, state, out_dir, dist, is_best=is_best, keep_last=cfg.train.keep_last)
    except NonFiniteWeights as err:
        raise TrainingDiverged(_diverged_message(f"{err} (update {state.global_step})",
                                                 parts.optimizer.param_groups[0]["lr"], cfg)) from None


def _preempted(cfg: RunConfig, parts: EngineParts, ema, state: TrainerState, out_dir: str, dist: DistInfo,
               logger: RunLogger, handler: PreemptionHandler, where: str, save: bool = True) -> None:
    """Save (every rank), let rank 0 requeue the SLURM job where asked to, and raise :class:`Preempted`."""
    tag = _save(cfg, parts, ema, state, out_dir, dist, is_best=False) if save else last_checkpoint(out_dir)
    folder = os.path.join(out_dir, "checkpoints", tag) if save else tag
    signum = handler.name if handler.requested else "another rank's signal"
    message = (f"preempted ({signum}): stopped after {where}; saved {folder}; resume=auto continues from it; "
               f"exit status {REQUEUE_EXIT_CODE}")
    logger.info(message)
    if dist.is_main:
        done = requeue_slurm_job(cfg.train.preempt_requeue)
        if done:
            logger.info(done)
    raise Preempted(message, folder)


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
    notes: list = field(default_factory=list)      # how the checkpoint was found, for the run's log


def preflight(cfg: RunConfig) -> Preflight:
    """Everything that can be checked before a process group starts or a file is written, in one pass: the data
    directories, the checkpoint to resume (found, partitioned like this run, holding this run's model), the model
    (``model.name`` registered, ``model.kwargs`` accepted: built on the meta device), ``model.init_checkpoint``
    (present, its tensors fit), the DeepSpeed config (file present, keys known to DeepSpeed) and the batch against
    the training set. Raises ConfigError, FileNotFoundError or CheckpointError naming the problem."""
    check_data_paths(cfg)
    _signals(cfg)
    if cfg.output.overwrite and cfg.resume is not None:
        raise ConfigError(f"output.overwrite: true starts a new run; it cannot be combined with resume={cfg.resume} "
                          f"(set one of them)")
    notes = []
    out_dir = os.path.abspath(cfg.output.dir)
    found = find_checkpoint(cfg.resume, out_dir, notes)
    check_run_files(out_dir, found)                 # output.dir can hold the run; the logs to continue are readable
    if found is None and not cfg.output.overwrite:
        check_fresh_output(out_dir)
    _, world_size = launch_rank_and_world()
    ds_config = build_deepspeed_config(cfg, world_size)
    if cfg.train.nonfinite == "skip" and ds_config["zero_optimization"]["stage"] == 3:
        raise ConfigError("train.nonfinite: 'skip' supports ZeRO stages 0-2 (this run uses stage 3); use 'stop'")
    num_classes = _num_classes(cfg)
    model = shape_model(cfg, num_classes)
    check_init_checkpoint(cfg, model)
    if found is not None:
        check_resumable(*found, world_size=world_size, zero_stage=ds_config["zero_optimization"]["stage"],
                        precision=cfg.train.precision)
        check_same_model(*found, model)
    bundle = build_data(cfg, model_data_config(model))
    steps_per_epoch(bundle, cfg, world_size)
    return Preflight(found, bundle, num_classes, notes)


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


def _signals(cfg: RunConfig) -> list:
    """The preemption signals: ``train.preempt_signals`` when set, else the environment's, else TERM and USR1."""
    configured = cfg.train.preempt_signals
    try:
        if configured is not None:
            return parse_signals(configured, source="train.preempt_signals")
        return parse_signals(os.environ.get(SIGNALS_ENV))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _run(cfg: RunConfig, local_rank: int | None, checked: Preflight) -> RunResult:
    signals = _signals(cfg)
    dist = init_distributed(local_rank)
    handler = PreemptionHandler(signals, requeue=cfg.train.preempt_requeue).install()       # a signal from here on stops at an update boundary
    try:
        return _run_installed(cfg, checked, dist, handler)
    finally:
        handler.restore()


def _run_installed(cfg: RunConfig, checked: Preflight, dist: DistInfo, handler: PreemptionHandler) -> RunResult:
    found, bundle = checked.found, checked.bundle
    out_dir = os.path.abspath(cfg.output.dir)
    group = None
    if dist.world_size > 1:      # the ranks agree on a stop over CPU tensors: no device synchronisation
        group = torch.distributed.new_group(backend="gloo")
    stop = StopAgreement(handler, group, dist.world_size)
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
    moved, repaired = None, []
    if dist.is_main:                       # the run's files change only once it is sure to start
        if found is None and cfg.output.overwrite:
            moved = move_aside(out_dir)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
        if found is not None:
            repaired = repair_published(out_dir, *found, state, ema is not None)
    barrier()
    logger = RunLogger(out_dir, dist.rank, progress_bar=cfg.output.progress_bar, tensorboard=cfg.output.tensorboard,
                       rank_log=cfg.output.rank_log, resume_step=state.global_step if found else None,
                       history=state.history)
    if moved:
        logger.info(f"output.overwrite: moved the previous run's checkpoints, weights and logs aside into {moved}")
    for note in checked.notes:
        logger.info(note)
    if repaired:
        logger.info(f"resume: published again after an interrupted save: {', '.join(repaired)}")
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

    logger.info(handler.describe())

    timing = {"updates": 0.0, "seconds": 0.0}
    start = time.perf_counter()
    start_step = state.global_step
    try:
        for epoch in range(state.epoch, t.epochs):
            row = {"epoch": epoch + 1}
            result = _train_one_epoch(epoch, cfg, parts, ema, bundle, dist, mixup, loss_fn, state, logger, timing,
                                      stop, start_step)
            if "stopped" in result:
                logger.end_epoch()
                state.micro_in_epoch, state.epoch_partial = result["stopped"]["micro"], result["stopped"]
                _preempted(cfg, parts, ema, state, out_dir, dist, logger, handler,
                           f"update {state.global_step} (epoch {epoch + 1}, micro-batch {state.micro_in_epoch} of "
                           f"{steps_per_epoch(bundle, cfg, dist.world_size)})")
            state.micro_in_epoch, state.epoch_partial = 0, {}
            row.update(result)
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
            saved = (epoch + 1) % t.save_interval == 0 or last
            if saved:
                _save(cfg, parts, ema, state, out_dir, dist, is_best)
            if not last and stop.settle():          # a signal during the epoch's last update, evaluation or save
                _preempted(cfg, parts, ema, state, out_dir, dist, logger, handler, f"the end of epoch {epoch + 1}",
                           save=not saved)
        stop.close()
    finally:
        logger.close()
    seconds = time.perf_counter() - start
    best = "n/a" if state.best_metric is None else f"{state.best_metric:.2f} (epoch {state.best_epoch + 1})"
    skipped = f"; {state.skipped} non-finite micro-batch(es) skipped" if state.skipped else ""
    logger.info(f"finished in {format_seconds(seconds)}; best top-1 {best}{skipped}; outputs in {out_dir}")
    return RunResult(out_dir=out_dir, history=state.history, best_top1=state.best_metric, best_epoch=state.best_epoch,
                     train_time_s=seconds, num_params=num_params, rank=dist.rank)
