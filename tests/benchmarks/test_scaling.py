"""CPU smoke test of the scaling-study runner: tiny models, 2 cells, interrupted, resumed; CSV, plots, summary."""
import csv
import json

import pytest

from benchmarks import scaling
from tests.helpers import TINY_DART, TINY_FIXED, TINY_VIM

SPEED = {"batch_size": 2, "device": "cpu", "amp": "none", "compile": False, "warmup": 1, "repeats": 1, "iters": 1}


def tiny_cells():
    return scaling.make_cells(["vim"], ["ti"], ["fixed", "dart"], [16], TINY_VIM, TINY_FIXED, TINY_DART)


def read(path):
    with open(path, newline="") as fh:
        return {row["cell"]: row for row in csv.DictReader(fh)}


def test_study_is_interrupted_and_resumed(tmp_path, monkeypatch):
    cells = tiny_cells()
    assert [c.key for c in cells] == ["vim-tiny-fixed-16", "vim-tiny-dart-16"]
    assert cells[0].model_kwargs == {"img_size": 32, "patch_size": 8, **TINY_VIM}
    assert cells[1].model_kwargs["num_tokens"] == 16
    calls = []

    def train_interrupted(cell):
        calls.append(cell["model"])
        if cell["tokenizer"] == "dart":
            raise KeyboardInterrupt          # Ctrl-C / a killed job in the middle of the second training run
        return {"accuracy": 42.0, "epochs": 1}

    with pytest.raises(KeyboardInterrupt):
        scaling.run_study(cells, ["flops", "infer", "accuracy"], tmp_path, speed_opts=SPEED,
                          train_fn=train_interrupted, log=lambda *a: None)
    rows = read(tmp_path / "scaling.csv")
    assert set(rows) == {"vim-tiny-fixed-16", "vim-tiny-dart-16"}
    fixed, dart = rows["vim-tiny-fixed-16"], rows["vim-tiny-dart-16"]
    assert float(fixed["gflops"]) > 0 and float(dart["gflops"]) > float(fixed["gflops"])
    assert float(dart["gflops_scorer_trunk"]) > 0 and float(fixed["gflops_scorer_trunk"]) == 0
    assert fixed["infer_status"] == dart["infer_status"] == "ok" and float(fixed["infer_img_per_s"]) > 0
    assert fixed["accuracy"] == "42.0" and json.loads(fixed["train_info"]) == {"epochs": 1}
    assert dart["accuracy"] == ""                                    # never finished: will be redone

    # resume: only the missing measurement runs (the others are not even attempted)
    monkeypatch.setattr(scaling, "measure_flops", lambda cell: pytest.fail("flops re-measured"))
    monkeypatch.setattr(scaling, "measure_speed", lambda cell, mode, opts: pytest.fail("speed re-measured"))
    resumed = []

    def train(cell):
        resumed.append(cell["model"])
        assert cell["workdir"].endswith("vim-tiny-dart-16") and cell["lr"] == 0.1
        return {"accuracy": 57.5}

    result = scaling.run_study(cells, ["flops", "infer", "accuracy"], tmp_path, speed_opts=SPEED, train_fn=train,
                               train_kwargs={"lr": 0.1}, log=lambda *a: None)
    assert resumed == ["vim_tiny_dart"]
    assert (result.done, result.skipped, result.remaining, result.stopped) == (1, 5, 0, "")
    rows = read(tmp_path / "scaling.csv")
    assert len(rows) == 2 and rows["vim-tiny-dart-16"]["accuracy"] == "57.5"
    assert rows["vim-tiny-fixed-16"]["accuracy"] == "42.0"
    for png in ("throughput_vs_tokens.png", "flops_vs_tokens.png", "accuracy_vs_tokens.png", "accuracy_vs_flops.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    summary = (tmp_path / "summary.md").read_text()
    assert "| vim | tiny | dart | 16 |" in summary
    assert not list(tmp_path.glob(".*.tmp"))                          # atomic writes leave no temporaries


def test_cli_budget_stop_and_resume(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--metrics", "flops", "--families", "vim", "--sizes", "ti", "--tokens", "16",
            "--model-kwargs", json.dumps(TINY_VIM), "--fixed-kwargs", json.dumps(TINY_FIXED),
            "--dart-kwargs", json.dumps(TINY_DART)]
    assert scaling.main(args + ["--max-cells", "1"]) == 0
    assert "stopped early" in capsys.readouterr().out
    assert list(read(tmp_path / "scaling.csv")) == ["vim-tiny-fixed-16"]
    assert scaling.main(args) == 0
    out = capsys.readouterr().out
    assert "1 measured, 1 already done, 0 left" in out
    assert list(read(tmp_path / "scaling.csv")) == ["vim-tiny-fixed-16", "vim-tiny-dart-16"]
    assert scaling.main(["--out", str(tmp_path), "--plots-only"]) == 0
    assert (tmp_path / "flops_vs_tokens.png").exists()


def test_failed_training_is_recorded_and_retried_on_request(tmp_path):
    cells = tiny_cells()[:1]

    def broken(cell):
        raise RuntimeError("diverged")

    scaling.run_study(cells, ["accuracy"], tmp_path, train_fn=broken, log=lambda *a: None)
    assert read(tmp_path / "scaling.csv")["vim-tiny-fixed-16"]["accuracy_status"].startswith("error: RuntimeError")
    skipped = scaling.run_study(cells, ["accuracy"], tmp_path, train_fn=broken, log=lambda *a: None)
    assert skipped.done == 0 and skipped.skipped == 1
    fixed = scaling.run_study(cells, ["accuracy"], tmp_path, train_fn=lambda cell: {"accuracy": 1.0},
                              retry_failed=True, log=lambda *a: None)
    assert fixed.done == 1 and read(tmp_path / "scaling.csv")["vim-tiny-fixed-16"]["accuracy"] == "1.0"


def test_train_command_template(tmp_path):
    train = scaling.train_fn_from_command(
        "python3 -c \"import json, sys; json.dump({'top1': 12.5, 'epochs': 3}, "
        "open(sys.argv[1] + '/metrics.json', 'w'))\" {workdir}")
    result = train({"model": "m", "model_kwargs": {"a": 1}, "tokens": 16, "workdir": str(tmp_path / "w")})
    assert result == {"accuracy": 12.5, "epochs": 3}


def test_exponents_and_checks():
    rows = []
    for n in (196, 392, 784, 1568):
        rows.append({"family": "vim", "size": "small", "tokenizer": "fixed", "tokens": n, "gflops": 0.027 * n,
                     "infer_img_per_s": 1e6 / n})
        rows.append({"family": "deit", "size": "small", "tokenizer": "fixed", "tokens": n,
                     "gflops": 0.023 * n + 1.2e-5 * n * n, "infer_img_per_s": 1e7 / n ** 1.3})
    exps = {e["family"]: e for e in scaling.exponents(rows)}
    assert exps["vim"]["gflops"] == pytest.approx(1.0) and exps["vim"]["infer_time"] == pytest.approx(1.0)
    assert exps["deit"]["infer_time"] == pytest.approx(1.3)
    checks = scaling.scaling_checks(list(exps.values()))
    assert all("ok" in line and "MISS" not in line for line in checks) and len(checks) == 2


def _merge_many(path, worker, queue):
    cells = [scaling.Cell("vim", "tiny", "fixed", 100 * worker + i, "m", {}) for i in range(5)]
    store = scaling.Store(path)
    for i, cell in enumerate(cells):
        store.update(cell, {"gflops": f"{worker}.{i}"})
    queue.put(worker)


def test_concurrent_jobs_merge_into_the_csv_without_losing_rows(tmp_path):
    """Four processes merging 5 cells each at the same time: all 20 rows land, each with its own value."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_merge_many, args=(tmp_path / "scaling.csv", w, queue)) for w in range(4)]
    for proc in procs:
        proc.start()
    assert sorted(queue.get(timeout=120) for _ in procs) == [0, 1, 2, 3]
    for proc in procs:
        proc.join(timeout=60)
    rows = read(tmp_path / "scaling.csv")
    assert {key: row["gflops"] for key, row in rows.items()} == {
        f"vim-tiny-fixed-{100 * w + i}": f"{w}.{i}" for w in range(4) for i in range(5)}
    assert not [p for p in tmp_path.iterdir() if p.name not in ("scaling.csv", "scaling.csv.lock")]


class _Job:
    def __init__(self, job_id, error):
        self.job_id, self.error = job_id, error

    def done(self):
        return True

    def exception(self):
        return self.error


class _InlinePool:
    """A submitit-like executor running each job at submission, in this process (tests the orchestration)."""

    def __init__(self, fail=()):
        self.fail, self.submitted = set(fail), []

    def submit(self, fn, out_dir, cell, *rest):
        self.submitted.append(cell["tokens"])
        if cell["tokens"] in self.fail:
            return _Job(len(self.submitted), RuntimeError(f"Traceback ...\nOSError: node lost ({cell['tokens']})"))
        fn(out_dir, cell, *rest)
        return _Job(len(self.submitted), None)


def test_fan_out_records_failed_jobs_skips_done_cells_and_retries(tmp_path):
    cells = scaling.make_cells(["vim"], ["ti"], ["fixed"], [16, 36, 64], TINY_VIM, TINY_FIXED, TINY_DART)
    accuracy = {16: 10.0, 36: 22.0, 64: 40.0}     # tokens * 10 // 16
    spec = {"cmd": "python3 -c \"import json, sys; json.dump({'top1': int(sys.argv[2]) * 10 // 16 * 1.0}, "
                   "open(sys.argv[1] + '/metrics.json', 'w'))\" {workdir} {tokens}"}
    lines = []
    pool = _InlinePool(fail={36})
    result = scaling.run_study_jobs(cells, ["accuracy"], tmp_path, executor="local", train_spec=spec, pool=pool,
                                    max_parallel=2, poll_s=0, plots=False, log=lines.append)
    assert pool.submitted == [16, 36, 64] and (result.done, result.skipped, result.remaining) == (2, 0, 0)
    rows = read(tmp_path / "scaling.csv")
    assert {k: (r["accuracy"], r["job_status"]) for k, r in rows.items()} == {
        "vim-tiny-fixed-16": ("10.0", "ok"), "vim-tiny-fixed-64": ("40.0", "ok"),
        "vim-tiny-fixed-36": ("", "failed: job 2: OSError: node lost (36)")}
    assert json.loads((tmp_path / "cells" / "vim-tiny-fixed-64.json").read_text())["accuracy"] == "40.0"
    assert "progress: 2 done / 0 running / 1 failed / 0 pending" in lines
    # a rerun skips finished and failed cells; --retry-failed resubmits the failed one only
    again = _InlinePool()
    assert scaling.run_study_jobs(cells, ["accuracy"], tmp_path, executor="local", train_spec=spec, pool=again,
                                  poll_s=0, plots=False, log=lines.append).skipped == 3 and again.submitted == []
    retried = scaling.run_study_jobs(cells, ["accuracy"], tmp_path, executor="local", train_spec=spec, pool=again,
                                     retry_failed=True, poll_s=0, plots=False, log=lines.append)
    assert again.submitted == [36] and retried.done == 1 and retried.remaining == 0
    rows = read(tmp_path / "scaling.csv")
    assert {k: float(r["accuracy"]) for k, r in rows.items()} == {f"vim-tiny-fixed-{n}": a for n, a in accuracy.items()}
    assert rows["vim-tiny-fixed-36"]["job_status"] == "ok"


def test_fan_out_arguments_are_checked(tmp_path):
    cells = tiny_cells()[:1]
    with pytest.raises(ValueError, match=r"^executor must be one of \('local', 'slurm'\), got 'pbs'$"):
        scaling.run_study_jobs(cells, ["flops"], tmp_path, executor="pbs")
    with pytest.raises(ValueError, match=r"^max_parallel must be an integer >= 1, got 0$"):
        scaling.run_study_jobs(cells, ["flops"], tmp_path, executor="local", max_parallel=0)
    with pytest.raises(SystemExit, match=r"^--max-parallel: expected an integer >= 1, got 0$"):
        scaling.main(["--out", str(tmp_path), "--metrics", "flops", "--executor", "local", "--max-parallel", "0"])
