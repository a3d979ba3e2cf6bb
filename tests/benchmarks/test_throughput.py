"""The throughput tool on tiny models on the CPU: sane fields, the device named, CLI outputs."""
import csv
import json

import pytest
import torch

from benchmarks import throughput
from benchmarks.common import cell_model, cpu_model_name, grid_for_tokens, slug

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_classes": 5}


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_run_one_reports_sane_fields(mode):
    row = throughput.run_one("vim_tiny_patch16_224", TINY, batch_size=2, mode=mode, device="cpu", warmup=1,
                             repeats=3, iters=1)
    assert row["status"] == "ok", row["status"]
    assert row["img_per_s"] > 0 and row["latency_ms"] > 0
    assert row["latency_ms_min"] <= row["latency_ms"] <= row["latency_ms_max"]
    assert row["img_per_s"] == pytest.approx(2 / (row["latency_ms"] / 1e3))
    assert cpu_model_name() in row["device"] and "threads" in row["device"]
    assert row["tokens"] == 16 and row["input"] == "32x32" and row["batch"] == 2 and row["mode"] == mode
    assert row["params_m"] > 0
    assert row["peak_mem_mib"] is None or row["peak_mem_mib"] >= 0
    assert row["mem_kind"].startswith("cpu")


def test_train_mode_steps_the_optimizer():
    model = throughput.build_model("vim_tiny_patch16_224", TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    throughput.measure(model, (3, 32, 32), 2, mode="train", device="cpu", warmup=1, repeats=1, iters=1)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_bf16_autocast_and_dart_model_run():
    kwargs = {"img_size": 64, "patch_size": 8, "grid_size": 4, "num_tokens": 12, "embed_dim": 32, "depth": 1,
              "num_classes": 5, "dart_cfg": {"trunk": "tiny_cnn"}}
    row = throughput.run_one("vim_tiny_dart", kwargs, batch_size=2, mode="infer", device="cpu", amp="bf16",
                             warmup=1, repeats=1, iters=1, with_flops=True)
    assert row["status"] == "ok", row["status"]
    assert row["tokens"] == 12 and row["gflops"] > 0 and row["amp"] == "bf16"


def test_failures_become_a_status(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(throughput, "measure", oom)
    assert throughput.run_one("vim_tiny_patch16_224", TINY, 2, device="cpu")["status"] == "oom"
    row = throughput.run_one("no_such_model_xyz", {}, 2, device="cpu")
    assert row["status"].startswith("error:")


def test_interleaved_cells_take_turns_and_keep_their_own_times(monkeypatch):
    """run_interleaved: every cell is timed one iteration per round, round r starting at cell r (mod cells); a
    repeat is the mean of a cell's iterations in it and each row's median is over its own repeats; a cell that fails
    to build is a status and the others still run."""
    order, index, count = [], {}, {}

    def fake_repeat(step, device, iters):            # cell i's k-th repeat takes 0.01 * i * k s: distinct
        order.append(step)
        index.setdefault(step, len(index) + 1)
        count[step] = count.get(step, 0) + 1
        return 0.01 * index[step] * count[step]
    monkeypatch.setattr(throughput, "_time_repeat", fake_repeat)
    cells = [("vim_tiny_patch16_224", TINY, 2, "infer"), ("no_such_model_xyz", {}, 2, "infer"),
             ("vim_tiny_patch16_224", TINY, 3, "infer"), ("vim_tiny_patch16_224", TINY, 2, "train")]
    rows = throughput.run_interleaved(cells, "cpu", warmup=1, repeats=3, iters=2)
    assert [r["status"] for r in rows][1].startswith("error:")
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["batch"], r["mode"]) for r in ok] == [(2, "infer"), (3, "infer"), (2, "train")]
    steps = list(dict.fromkeys(order))                # in order of first appearance: the cells
    assert order == [steps[(k + r) % 3] for r in range(6) for k in range(3)]
    for row, step in zip(ok, steps):
        i = steps.index(step) + 1       # its iterations take 0.01 i (1, 2, ..., 6): repeats 1.5, 3.5, 5.5 x 0.01 i
        assert row["latency_ms"] == pytest.approx(1e3 * 0.01 * i * 3.5)
        assert row["timing"] == "interleaved" and row["repeats"] == 3 and row["mem_kind"].startswith("cpu")


def test_cli_interleaves_several_cpu_cells_unless_told_not_to(capsys):
    base = ["--model", "vim_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--device", "cpu",
            "--batch-size", "2", "3", "--warmup", "1", "--repeats", "1", "--iters", "1"]
    assert throughput.main(base) == 0
    assert "the cells interleaved" in capsys.readouterr().out
    assert throughput.main(base + ["--interleave", "off"]) == 0
    assert "one cell after the other" in capsys.readouterr().out


def test_cli_writes_csv_json_and_prints_the_table_last(tmp_path, capsys):
    out_csv, out_json = tmp_path / "t.csv", tmp_path / "t.json"
    rc = throughput.main(["--model", "vim_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--device", "cpu",
                          "--batch-size", "2", "--mode", "infer", "train", "--warmup", "1", "--repeats", "2",
                          "--iters", "1", "--csv", str(out_csv), "--json", str(out_json)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device: ") and cpu_model_name() in lines[0]
    assert lines[-1].startswith("| vim_tiny_patch16_224 ") and lines[-2].startswith("| vim_tiny_patch16_224 ")
    assert any(line.startswith("| model | kwargs | tokens") for line in lines[-5:])
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["mode"] for r in rows] == ["infer", "train"] and float(rows[0]["img_per_s"]) > 0
    payload = json.loads(out_json.read_text())
    assert payload["environment"]["device_type"] == "cpu" and len(payload["rows"]) == 2


def test_token_counts_map_to_models():
    assert grid_for_tokens(196) == (14, 14) and grid_for_tokens(392) == (14, 28)
    assert grid_for_tokens(1568) == (32, 49) and grid_for_tokens(121) == (11, 11)
    with pytest.raises(ValueError):
        grid_for_tokens(13)
    assert throughput.tokens_kwargs("vim_small_patch16_224", 784) == {"img_size": 448}
    assert throughput.tokens_kwargs("deit_small_patch16_224", 1568) == {"img_size": (512, 784)}
    assert throughput.tokens_kwargs("vim_small_dart", 392) == {"num_tokens": 392}
    assert cell_model("vim", "s", "fixed", 392) == ("vim_small_patch16_224", {"img_size": (224, 448)})
    assert cell_model("deit", "b", "dart", 121) == ("deit_base_dart", {"num_tokens": 121})
    assert cell_model("vim", "ti", "fixed", 16, overrides={"patch_size": 8, "img_size": 99, "depth": 1}) == (
        "vim_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1})
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_cpu_inference_table_plans_every_cell_and_runs_tiny_ones(monkeypatch):
    """The CPU inference table: Vim fixed and DART, DeiT fixed, at 196 / 784 tokens (DART through num_tokens, fixed
    grids through the image), batch 1 / 32, eager and compiled; each cell goes through run_one."""
    from benchmarks import cpu_inference

    cells = cpu_inference.plan(["vim", "deit"], ["tiny", "small"], ["fixed", "dart"], [196, 784], [1, 32],
                               [False, True])
    labels = {c["label"] for c in cells}
    assert labels == {"Vim-Ti", "Vim-Ti-DART", "Vim-S", "Vim-S-DART", "DeiT-Ti", "DeiT-S"}
    assert len(cells) == 6 * 2 * 2 * 2
    dart = next(c for c in cells if c["label"] == "Vim-S-DART" and c["tokens"] == 784)
    assert dart["model"] == "vim_small_dart" and dart["kwargs"] == {"num_tokens": 784}
    fixed = next(c for c in cells if c["label"] == "DeiT-Ti" and c["tokens"] == 784)
    assert fixed["kwargs"] == {"img_size": 448}
    seen = []

    def fake_run_one(name, kwargs, batch, mode, device, amp, compile, warmup, repeats, iters):
        seen.append((name, batch, compile, iters))
        return {"model": name, "batch": batch, "status": "ok", "img_per_s": 1.0, "latency_ms": 1.0}

    monkeypatch.setattr(throughput, "run_one", fake_run_one)
    rows = cpu_inference.run_table(cells[:4], warmup=1, repeats=1, log=lambda *a: None)
    assert [(r["label"], r["compile"]) for r in rows] == [(c["label"], "yes" if c["compile"] else "no")
                                                          for c in cells[:4]]
    assert [s[3] for s in seen] == [5 if c["batch"] == 1 else 1 for c in cells[:4]]
    text = cpu_inference.render(rows, {"host_cpu": "Some CPU", "torch": "x", "backends": {"scan": "cpp"}}, 2)
    assert text.startswith("### CPU inference on Some CPU (2 threads") and "scan=cpp" in text
