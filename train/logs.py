"""What a run reports: a tqdm progress bar with interval log lines above it (rank 0), ``steps.csv`` (one row per
log interval), ``summary.csv`` (one row per epoch), optional TensorBoard, and optional per-rank files.

On resume, ``steps.csv`` keeps only the rows up to the checkpoint's update count and ``summary.csv`` is rewritten
from the checkpoint's history, so the files read as if the run had never stopped. A file that cannot be read
(not UTF-8 text, not CSV, no ``step`` column, a step that is not an integer) or written (a full disk) is a
one-line :class:`~dartmamba_train.errors.RunFileError` naming it.
"""
from __future__ import annotations

import csv
import io
import os
import sys

from dartmamba.files import atomic_write_text
from .errors import CorruptRunFile, file_error

__all__ = ["RunLogger", "format_seconds", "read_csv", "check_logs"]

# epochs are counted from 1 in the files; "step" is the number of optimizer updates done
STEP_FIELDS = ["epoch", "step", "loss", "lr", "img_per_s", "data_ms"]
SUMMARY_FIELDS = ["epoch", "step", "train_loss", "lr", "val_loss", "top1", "top5", "ema_top1", "ema_top5",
                  "epoch_time_s", "img_per_s"]
RANK_FIELDS = ["epoch", "step", "local_loss", "loss"]


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_csv(path: str) -> list[dict]:
    """Complete rows of a CSV file (a line cut short by a kill is dropped); CorruptRunFile naming the file when it is
    not UTF-8 text or not CSV."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            text = handle.read()
        if text and not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        rows = list(csv.DictReader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise file_error(path, exc, "reading") from None
    return [r for r in rows if None not in r.values() and None not in r]


def _corrupt(path: str, cause: str) -> CorruptRunFile:
    return CorruptRunFile(f"{path}: cannot read the run's log ({cause}); move the file aside (the run then starts "
                          f"a new one) or restore it from a copy", path)


def _rows_up_to(path: str, resume_step: int) -> list[dict]:
    """The rows of a log CSV with ``step`` <= ``resume_step``; CorruptRunFile naming the file and the bad row."""
    rows = read_csv(path)
    if rows and "step" not in rows[0]:
        raise _corrupt(path, f"no 'step' column; its header is {','.join(rows[0])!r}")
    kept = []
    for number, row in enumerate(rows, start=2):
        try:
            step = int(row["step"])
        except ValueError:
            raise _corrupt(path, f"line {number}: step {row['step'][:40]!r} is not an integer") from None
        if step <= resume_step:
            kept.append(row)
    return kept


def check_logs(out_dir: str, resume_step: int | None = None) -> None:
    """Before a resume: the run's ``steps.csv`` (and per-rank CSVs) can be read and cut at ``resume_step``
    (None: any step), so the resumed run cannot fail on them; CorruptRunFile naming the file otherwise."""
    paths = [os.path.join(out_dir, "steps.csv")]
    ranks = os.path.join(out_dir, "ranks")
    if os.path.isdir(ranks):
        paths += [os.path.join(ranks, name) for name in sorted(os.listdir(ranks)) if name.endswith(".csv")]
    for path in paths:
        _rows_up_to(path, resume_step if resume_step is not None else 2**62)


def _csv_text(fields: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write(path: str, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise file_error(path, exc, "writing", needed=len(text.encode())) from None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"           # nan, inf and -inf as such: an empty cell would hide a divergence
    return "" if value is None else str(value)


class RunLogger:
    """Rank 0 writes the shared files and shows progress; with ``rank_log`` every rank also writes its own CSV."""

    def __init__(self, out_dir: str, rank: int, *, progress_bar: bool, tensorboard: bool, rank_log: bool,
                 resume_step: int | None = None, history: list | None = None):
        self.out_dir, self.rank, self.is_main = out_dir, rank, rank == 0
        self.steps_path = os.path.join(out_dir, "steps.csv")
        self.summary_path = os.path.join(out_dir, "summary.csv")
        self.rank_path = os.path.join(out_dir, "ranks", f"rank{rank}.csv") if rank_log else None
        self.progress_bar, self._bar, self._writer = progress_bar, None, None
        if self.is_main:
            os.makedirs(out_dir, exist_ok=True)
            self._restart_csv(self.steps_path, STEP_FIELDS, resume_step)
            _write(self.summary_path, _csv_text(SUMMARY_FIELDS, [
                {k: _fmt(v) for k, v in row.items()} for row in (history or [])]))
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as err:
                    raise ImportError("output.tensorboard=true needs the tensorboard package "
                                      "(pip install 'dartmamba[tensorboard]')") from err
                self._writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if self.rank_path is not None:
            os.makedirs(os.path.dirname(self.rank_path), exist_ok=True)
            self._restart_csv(self.rank_path, RANK_FIELDS, resume_step)

    @staticmethod
    def _restart_csv(path: str, fields: list[str], resume_step: int | None) -> None:
        """A fresh file, or on resume the rows up to ``resume_step`` (rewritten atomically)."""
        rows = [] if resume_step is None else _rows_up_to(path, resume_step)
        _write(path, _csv_text(fields, rows))

    @staticmethod
    def _append(path: str, fields: list[str], row: dict) -> None:
        line = _csv_text(fields, [{k: _fmt(v) for k, v in row.items()}]).split("\n", 1)[1]
        try:
            with open(path, "a", newline="", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
        except OSError as exc:
            raise file_error(path, exc, "appending a row to", needed=len(line.encode())) from None

    # -- progress ------------------------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total_steps: int) -> None:
        if self.is_main and self.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                             dynamic_ncols=True, file=sys.stderr, disable=None)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- records ---------------------------------------------------------------------------------------------------
    def interval(self, *, epoch: int, epochs: int, step: int, step_in_epoch: int, steps_in_epoch: int, loss: float,
                 local_loss: float, lr: float, img_per_s: float, data_ms: float, eta_s: float,
                 skipped: int = 0) -> None:
        """One log interval: a line above the bar, a ``steps.csv`` row, TensorBoard scalars."""
        if self.rank_path is not None:
            self._append(self.rank_path, RANK_FIELDS, dict(epoch=epoch + 1, step=step, local_loss=local_loss, loss=loss))
        if not self.is_main:
            return
        self.info(f"epoch {epoch + 1}/{epochs} step {step_in_epoch}/{steps_in_epoch} (update {step})  "
                  f"loss {loss:.4f}  lr {lr:.3e}  {img_per_s:.0f} img/s  data {data_ms:.1f} ms/step  "
                  f"ETA {format_seconds(eta_s)}" + (f"  skipped {skipped} non-finite" if skipped else ""))
        self._append(self.steps_path, STEP_FIELDS, dict(epoch=epoch + 1, step=step, loss=loss, lr=lr,
                                                        img_per_s=img_per_s, data_ms=data_ms))
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/lr", lr, step)
            self._writer.add_scalar("train/img_per_s", img_per_s, step)

    def epoch_summary(self, history: list[dict]) -> None:
        """Rewrite ``summary.csv`` from the run's history (atomic) and print the last row."""
        if not self.is_main:
            return
        _write(self.summary_path, _csv_text(SUMMARY_FIELDS, [
            {k: _fmt(v) for k, v in row.items()} for row in history]))
        row = history[-1]
        parts = [f"epoch {row['epoch']} done in {format_seconds(row['epoch_time_s'])}",
                 f"train loss {row['train_loss']:.4f}"]
        if row.get("top1") is not None:
            parts.append(f"val loss {row['val_loss']:.4f} top-1 {row['top1']:.2f} top-5 {row['top5']:.2f}")
        if row.get("ema_top1") is not None:
            parts.append(f"EMA top-1 {row['ema_top1']:.2f}")
        self.info("  ".join(parts))
        if self._writer is not None:
            for key in ("val_loss", "top1", "top5", "ema_top1", "ema_top5"):
                if row.get(key) is not None:
                    self._writer.add_scalar(f"val/{key}", row[key], row["step"])

    def close(self) -> None:
        self.end_epoch()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
