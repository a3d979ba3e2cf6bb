"""The CPU-side logic of the GPU check: the one-command script's plan, and the Vim/DeiT table's bookkeeping."""
import shutil
import subprocess

import pytest

from benchmarks import model_table
from tests.helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def dry_run(*args):
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


@needs_bash
def test_dry_run_lists_every_step():
    done = dry_run()
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "budget 540 s (full)" in out
    for step in ("install", "gpu-tests", "model-table", "resample", "scaling", "summary"):
        assert f"] {step} (limit" in out, step
    gpu_tests = next(line for line in out.splitlines() if "] gpu-tests" in line)
    assert "TRITON_INTERPRET=0" in gpu_tests and "-m gpu" in gpu_tests
    assert "tests/models/test_gpu_models.py" in gpu_tests and "tests/ops/test_selective_scan.py" in gpu_tests
    assert "--compile" in out and "benchmarks.scaling --metrics flops infer" in out
    tokenizer = next(line for line in out.splitlines() if "] tokenizer" in line)
    assert "bench_tokenizer.py" in tokenizer and "not present" not in out


@needs_bash
def test_dry_run_quick_steps_and_errors():
    quick = dry_run("--quick", "--steps", "table,scaling")
    assert quick.returncode == 0, quick.stderr
    assert "budget 300 s (quick)" in quick.stdout and "--quick" in quick.stdout
    assert "gpu-tests" not in quick.stdout and "resample (limit" not in quick.stdout
    assert "--sizes s " in quick.stdout
    assert dry_run("--steps", "tests,nonsense").returncode == 2
    assert dry_run("--frobnicate").returncode == 2


def test_table_halves_the_batch_on_oom_and_compares_with_deit(monkeypatch):
    calls = []

    def fake_run_one(name, kwargs, batch, mode, device, amp, compile, warmup, repeats, iters):
        calls.append((name, batch, mode, compile, kwargs.get("bimamba_impl")))
        if "vim_small_dart" in name and batch > 64:
            return {"model": name, "batch": batch, "mode": mode, "status": "oom"}
        speed = {"deit_small_patch16_224": 4000.0, "vim_small_patch16_224": 5000.0, "vim_small_dart": 1000.0}[name]
        if kwargs.get("bimamba_impl") == "two_pass":
            speed /= 2
        tokens = kwargs.get("num_tokens") or (784 if kwargs.get("img_size") == 448 else 196)
        return {"model": name, "batch": batch, "mode": mode, "status": "ok", "tokens": tokens,
                "img_per_s": speed / (1 if mode == "infer" else 4)}

    import benchmarks.throughput as throughput
    monkeypatch.setattr(throughput, "run_one", fake_run_one)
    saved = []
    rows = model_table.run_table("cpu", batch_size=256, compile_rows=True, on_row=lambda r: saved.append(len(r)),
                                 log=lambda *a: None)
    assert len(rows) == 18 and saved == list(range(1, 19))
    dart = [r for r in rows if r["label"].startswith("Vim-S-DART")]
    assert all(r["batch"] == 64 and r["status"] == "ok" for r in dart)
    assert [c[1] for c in calls if c[0] == "vim_small_dart"][:3] == [256, 128, 64]
    # one-pass and two-pass Vim-S at 224 (196 tokens), batch 256, inference and training, side by side
    impls = {(c[2], c[4]) for c in calls if c[0] == "vim_small_patch16_224" and c[1] == 256 and not c[3]}
    assert {("infer", "fused"), ("infer", "two_pass"), ("train", "fused"), ("train", "two_pass")} <= impls
    one = {(r["tokens"], r["mode"]): r for r in rows if r["label"] == "Vim-S one-pass"}
    two = {(r["tokens"], r["mode"]): r for r in rows if r["label"] == "Vim-S two-pass"}
    assert set(one) == set(two) == {(196, "infer"), (196, "train")}
    assert one[(196, "infer")]["vs_deit"] == pytest.approx(1.25) and two[(196, "infer")]["vs_deit"] == pytest.approx(0.625)
    assert one[(196, "infer")]["target"] == ">= 4,500: ok" and two[(196, "infer")]["target"] == ">= 4,500: MISS"
    assert one[(196, "train")]["target"] == ">= 1,300: MISS"            # 1250 img/s
    assert sum(1 for c in calls if c[3]) >= 4                              # compiled rows
    text = model_table.render(rows, {"device": "Some GPU", "torch": "x", "backends": {"scan": "cuda"}}, "bf16")
    assert text.startswith("### Vim-S / Vim-S-DART vs DeiT-S on Some GPU") and "scan=cuda" in text


def test_table_time_budget_skips_the_rest(monkeypatch):
    import benchmarks.throughput as throughput
    monkeypatch.setattr(throughput, "run_one", lambda name, kwargs, batch, mode, *a: {
        "model": name, "batch": batch, "mode": mode, "status": "ok", "tokens": 196, "img_per_s": 1.0})
    rows = model_table.run_table("cpu", time_budget=0.0, log=lambda *a: None)
    assert len(rows) == 14 and all(r["status"] == "skipped (time budget)" for r in rows)
    assert model_table.render(rows, {"device": "d", "torch": "t"}, "bf16").count("skipped (time budget)") == 14
    rows = model_table.run_table("cpu", time_budget=1e9, log=lambda *a: None)
    assert all(r["status"] == "ok" for r in rows)


def test_cpu_smoke_run_times_both_mixers(tmp_path):
    """The script's CPU smoke settings (tiny models, batch 2): the one-pass and two-pass rows really build their
    mixer and run."""
    import timm

    import dartmamba.models  # noqa: F401

    rows = model_table.run_table("cpu", batch_size=2, amp="none", modes=("infer", "train"), warmup=1, repeats=1,
                                 iters=1, tiny=True, log=lambda *a: None)
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for label, impl in (("Vim-S one-pass", "fused"), ("Vim-S two-pass", "two_pass")):
        mine = [r for r in rows if r["label"] == label]
        assert [r["mode"] for r in mine] == ["infer", "train"] and all(f'"bimamba_impl": "{impl}"' in r["kwargs"]
                                                                       for r in mine)
        model = timm.create_model("vim_small_patch16_224", bimamba_impl=impl, **model_table.TINY)
        assert model.layers[0].mixer.bimamba_impl == impl
