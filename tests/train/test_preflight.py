"""Everything checkable is checked before a process group starts or a file is written: the CLI exits 2 with one
line naming the problem (the model's name and arguments, the DeepSpeed JSON and its keys, the checkpoint to start
from, the batch against the data set)."""
from __future__ import annotations

import json
import os

import pytest

import dartmamba  # noqa: F401  (registers the models)
from dartmamba_train import loop
from dartmamba_train.cli import main
from dartmamba_train.config import ConfigError, load_config
from dartmamba_train.engine import build_deepspeed_config

from tests.train.train_helpers import ds_json

pytest.importorskip("deepspeed")



@pytest.fixture
def no_process_group(monkeypatch):
    """Fail loudly if the run gets as far as starting a process group."""
    def refuse(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(loop, "init_distributed", refuse)


def tiny_checkpoint(path, **kwargs):
    import timm

    model = timm.create_model("deit_tiny_dart", num_classes=10, **{
        "img_size": 32, "patch_size": 8, "grid_size": 4, "num_tokens": 16, "embed_dim": 32, "depth": 2,
        "num_heads": 2, "dart_cfg": {"trunk": "tiny_cnn", "head": "v2"}, **kwargs})
    dartmamba.save_model(model, str(path))
    return path


@pytest.mark.parametrize("case", ["model_name", "model_kwargs", "deit_heads", "ds_json", "init_missing",
                                  "init_shapes", "batch", "ds_bogus", "ds_stagee", "ds_stage"])
def test_cli_checks_before_any_process_group(tmp_path, tiny_recipe, capsys, no_process_group, case):
    out = tmp_path / "run"
    wrong = tiny_checkpoint(tmp_path / "wide.safetensors", embed_dim=48) if case == "init_shapes" else None
    override, expected = {
        "model_name": ("model.name=deit_tiny_drat",
                       "config error: model.name: unknown model 'deit_tiny_drat'; similar registered names: "
                       "['deit_tiny_dart'"),
        "model_kwargs": ("model.kwargs.embed_dim=0", "config error: model.kwargs: deit_tiny_dart rejected its arguments "
                         "['dart_cfg', 'depth', 'embed_dim', 'grid_size', 'img_size', 'num_heads', 'num_tokens', "
                         "'patch_size']: embed_dim must be an int >= 1 (the token width D), got 0"),
        "deit_heads": ("model.kwargs.embed_dim=33", "embed_dim must be divisible by num_heads, got embed_dim=33 and "
                       "num_heads=2"),
        "ds_json": ("deepspeed.config=deepspeed/zero7.json", "config error: deepspeed.config: file not found: "
                    f"{os.path.join(os.getcwd(), 'deepspeed', 'zero7.json')} (a path in a YAML is relative to that "
                    f"YAML, one on the command line to the working directory)"),
        "init_missing": (f"model.init_checkpoint={tmp_path}/nope.safetensors",
                         f"model.init_checkpoint: file not found: {tmp_path}/nope.safetensors"),
        "init_shapes": (f"model.init_checkpoint={wrong}",
                        f"config error: model.init_checkpoint: {wrong} does not fit deit_tiny_dart: tensor 'cls_token' "
                        f"has shape (1, 1, 48) there, the model (1, 1, 32)"),
        "batch": ("train.batch_size=256", "config error: train.batch_size: 256 x grad_accum 1 x 1 process(es) needs "
                  "more than the 192 training samples"),
        "ds_bogus": ("deepspeed.overrides.bogus_key=1", "config error: deepspeed.overrides: unknown DeepSpeed key "
                     "'bogus_key' (DeepSpeed would ignore it)"),
        "ds_stagee": ("deepspeed.overrides.zero_optimization.stagee=2", "config error: deepspeed.overrides: unknown "
                      "DeepSpeed key 'zero_optimization.stagee' (did you mean 'zero_optimization.stage'?); valid "
                      "keys under zero_optimization: "),
        "ds_stage": ("deepspeed.overrides.zero_optimization.stage=5", "config error: deepspeed.overrides: "
                     "zero_optimization.stage: Input should be 0, 1, 2, 3"),
    }[case]
    assert main(["--config", tiny_recipe, f"output.dir={out}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dartmamba-train: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not out.exists()


def test_the_deepspeed_key_check_names_the_json_file(tmp_path, tiny_recipe):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_com": True}, "gradient_clippin": 1.0}))
    with pytest.raises(ConfigError) as err:
        build_deepspeed_config(load_config(tiny_recipe, [f"deepspeed.config={path}"]), 1)
    assert str(err.value).startswith(f"deepspeed.config {path}: unknown DeepSpeed key "
                                     f"'zero_optimization.overlap_com' (did you mean 'zero_optimization.overlap_comm'?)")
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clippin": 1.0}))
    with pytest.raises(ConfigError) as err:
        build_deepspeed_config(load_config(tiny_recipe, [f"deepspeed.config={path}"]), 1)
    assert str(err.value) == (f"deepspeed.config {path}: unknown DeepSpeed key 'gradient_clippin' (did you mean "
                              f"'gradient_clipping'?) (DeepSpeed would ignore it)")


@pytest.mark.parametrize("overrides", [
    [],
    [f"deepspeed.config={ds_json(1)}"], [f"deepspeed.config={ds_json(2)}"], [f"deepspeed.config={ds_json(3)}"],
    ["deepspeed.overrides={flops_profiler: {enabled: false}, activation_checkpointing: {}, tensorboard: "
     "{enabled: false}, comms_logger: {enabled: false}, communication_data_type: fp32, prescale_gradients: false, "
     "zero_force_ds_cpu_optimizer: false, dump_state: false, memory_breakdown: false}"],
    ["deepspeed.stage=2", "deepspeed.overrides.zero_optimization.offload_optimizer.device=cpu"],
])
def test_valid_deepspeed_configs_pass_the_key_check(tiny_recipe, overrides):
    ds = build_deepspeed_config(load_config(tiny_recipe, overrides), 4)
    assert ds["train_batch_size"] == 4 * ds["train_micro_batch_size_per_gpu"]


def test_a_relative_deepspeed_json_is_relative_to_the_working_directory_only(tmp_path, monkeypatch):
    """No fallback to a checkout's configs/: a relative path (a config built in code) means the working directory."""
    from dartmamba_train.engine import resolve_deepspeed_json

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_deepspeed_json("deepspeed/zero0.json")
    assert str(err.value) == (f"deepspeed.config: file not found: deepspeed/zero0.json (looked in: "
                              f"{tmp_path / 'deepspeed' / 'zero0.json'}, relative to the working directory)")
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "zero0.json").write_text("{}")
    assert resolve_deepspeed_json("deepspeed/zero0.json") == str(tmp_path / "deepspeed" / "zero0.json")
