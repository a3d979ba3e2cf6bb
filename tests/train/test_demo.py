"""The demo driver: both runs through the real entry point, the figure, the summary, and the sample-share metric."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import dartmamba

from dartmamba.tokenizer import DartTokenizer

pytest.importorskip("deepspeed")


def test_object_sample_fraction_of_a_regular_grid_is_the_area_share():
    from dartmamba_train.demo import object_sample_fraction

    tokenizer = DartTokenizer(img_size=32, patch_size=8, grid_size=4, num_tokens=16, embed_dim=8, trunk="tiny_cnn",
                              uniform_scores=True)
    images = torch.zeros(2, 3, 32, 32)
    boxes = torch.tensor([[8.0, 8.0, 16.0, 24.0], [0.0, 0.0, 32.0, 32.0]])
    torch.testing.assert_close(object_sample_fraction(tokenizer, images, boxes), torch.tensor([128 / 1024, 1.0]))


@pytest.mark.slow
def test_demo_trains_both_models_and_reports(tmp_path, capsys):
    from dartmamba_train.demo import main
    from dartmamba_train.logs import read_csv

    out = tmp_path / "demo"
    summary = main(["--out", str(out), "train.epochs=1", "train.steps_per_epoch=4", "data.canvas.val_length=24",
                    "train.log_interval=2"])
    printed = capsys.readouterr().out
    for key, folder in (("dart", "vim_dart"), ("fixed", "vim_fixed")):
        run = summary["runs"][key]
        assert run["tokens"] == 16 and run["out_dir"] == str(out / folder)
        rows = read_csv(str(out / folder / "summary.csv"))
        assert len(rows) == 1 and float(rows[0]["top1"]) == run["top1"]
        assert (out / folder / "checkpoints" / "last").read_text() == "epoch0001"
        # the consolidated weights carry the model config: one line back to the trained model
        weights = load_file(str(out / folder / "last.safetensors"))
        model = dartmamba.load_model(str(out / folder / "last.safetensors"))
        assert model.num_classes == 10 and model.num_tokens == 16
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    # the figure's models are the saved weights: they reproduce the accuracies the runs reported
    assert summary["dart_top1"] == pytest.approx(summary["runs"]["dart"]["top1"], abs=1e-4)
    assert summary["fixed_top1"] == pytest.approx(summary["runs"]["fixed"]["top1"], abs=1e-4)
    assert 0 < summary["object_area_fraction"] < 1 and 0 < summary["dart_samples_on_object"] < 1
    png = (out / "dart_tokens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert "DART - fixed grid at equal token count:" in printed and str(out / "dart_tokens.png") in printed
    assert "[dart ] vim_tiny_dart:" in printed and "[fixed] vim_tiny_patch16_224:" in printed


def test_the_fixed_grid_run_trains_at_a_lower_priority(monkeypatch, tmp_path):
    """The DART run decides when the demo ends: the fixed-grid run (and its loader) start niced, so on a saturated
    machine the DART run's steps go first; the child really runs at that niceness."""
    import subprocess
    import sys

    from dartmamba_train import demo

    captured = {}

    class FakePopen:
        def __init__(self, cmd, **kwargs):
            if "--config" in cmd:
                captured[os.path.basename(cmd[cmd.index("--config") + 1])] = kwargs.get("preexec_fn")
            self.stdout = iter(())

    monkeypatch.setattr(demo.subprocess, "Popen", FakePopen)
    for key, (recipe, label) in demo.RUNS.items():
        demo._launch(demo.DemoRun(key, f"{recipe}.yaml", str(tmp_path / recipe), label), [], 1)
    assert captured["vim_dart.yaml"] is None
    assert demo.NICENESS["fixed"] > 0
    monkeypatch.undo()                                    # the real Popen again (the fake replaced subprocess's)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"], capture_output=True, text=True,
                           preexec_fn=captured["vim_fixed.yaml"], check=True)
    assert int(child.stdout) == os.nice(0) + demo.NICENESS["fixed"]

