"""Config loading: schema, types, inheritance, overrides, saved config, and errors that name the key."""
from __future__ import annotations

import importlib.resources
import json
import os
import shutil

import pytest
import yaml

from dartmamba_train.cli import main
from dartmamba_train.config import (ConfigError, config_from_dict, config_to_dict, load_config,
                                    parse_override, recipe_names, save_config)
from dartmamba_train.engine import build_deepspeed_config

from tests.train.train_helpers import TINY_DART, ds_json, write_recipe

RECIPES = str(importlib.resources.files("dartmamba_configs"))


def test_defaults_and_overrides_are_typed(tiny_recipe):
    cfg = load_config(tiny_recipe, ["train.epochs=7", "optim.lr=1e-3", "data.canvas.object_size=[10, 14]",
                                    "model.kwargs.num_tokens=9", "train.ema.enabled=true", "resume=auto"])
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.canvas.object_size == [10, 14]
    assert cfg.model.kwargs["num_tokens"] == 9 and cfg.model.kwargs["dart_cfg"] == {"trunk": "tiny_cnn", "head": "v2"}
    assert cfg.train.ema.enabled is True and cfg.resume == "auto"
    assert cfg.train.batch_size == 32            # from the file
    assert cfg.sched.min_lr == 1e-5              # schema default


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", "unknown key 'train.epochz' (did you mean 'train.epochs'?)"),
    ("trian.epochs=3", "unknown key 'trian' (did you mean 'train'?)"),
    ("train.ema.decai=0.9", "unknown key 'train.ema.decai' (did you mean 'train.ema.decay'?)"),
    ("train.epochs=ten", "train.epochs: expected an int, got 'ten' (str)"),
    ("train.batch_size=2.5", "train.batch_size: expected an int, got 2.5 (float)"),
    ("train.compile=yes please", "train.compile: expected true or false, got 'yes please' (str)"),
    ("train.precision=fp16", "train.precision: expected one of 'fp32', 'bf16', 'amp_bf16', got 'fp16' (str)"),
    ("optim.lr=-1", "optim.lr: expected null or a number > 0, got -1.0"),
    ("data.canvas.object_size=[12]", "data.canvas.object_size: expected a [low, high] pair, got [12]"),
    ("data.canvas.object_size=[40, 48]", "data.canvas.object_size: values must be <= 32, got [40, 48]"),
    ("train.epochs", "override 'train.epochs': expected key=value (e.g. train.epochs=10)"),
    ("train=3", "override 'train=3': 'train' is a section; set one of its keys, e.g. train.epochs=..."),
    ("train.epochs.x=3", "override 'train.epochs.x=3': 'train.epochs' is a value, not a section"),
    ("deepspeed.stage=4", "deepspeed.stage: expected null or one of 0, 1, 2, 3, got 4"),
    ("data.kind=imagefolder", "override 'data.kind=imagefolder': data.root: required when data.kind is 'imagefolder'"),
    ("aug.mixup=0.8", "override 'train.batch_size=31': train.batch_size: mixup/cutmix need an even batch, got 31"),
    # types are strict: no bool for an int or a Literal of ints, no string for a bool
    ("train.epochs=true", "override 'train.epochs=true': train.epochs: expected an int, got True (bool)"),
    ("deepspeed.stage=true", "deepspeed.stage: expected null or one of 0, 1, 2, 3, got True (bool)"),
    ("train.compile=1", "train.compile: expected true or false, got 1 (int)"),
    ("data.mean=3", "data.mean: expected null or a list of numbers, got 3 (int)"),
    ("data.canvas.object_size=[12, x]", "data.canvas.object_size[1]: expected an int, got 'x' (str)"),
    ("data={kind: canvass}", "override 'data={kind: canvass}': data.kind: expected one of 'imagefolder', 'canvas', "
                             "'video_canvas', got 'canvass' (str)"),
    ("data={kindd: canvas}", "override 'data={kindd: canvas}': unknown key 'data.kindd' (did you mean 'data.kind'?)"),
    # ranges and rules, each beside its field
    ("train.epochs=0", "train.epochs: expected an int >= 1, got 0"),
    ("train.keep_last=0", "train.keep_last: expected an int >= 1, got 0"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch: expected null or an int >= 1, got 0"),
    ("train.clip_grad=0", "train.clip_grad: expected null or a number > 0, got 0.0"),
    ("train.ema.decay=1", "train.ema.decay: expected a number in (0, 1), got 1.0"),
    ("data.num_workers=-1", "data.num_workers: expected an int >= 0, got -1"),
    ("data.crop_pct=1.5", "data.crop_pct: expected null or a number in (0, 1], got 1.5"),
    ("data.mean=[0.5, 0.5]", "data.mean: expected null or 1 or 3 numbers, got [0.5, 0.5]"),
    ("data.std=[0.5, 0, 0.5]", "data.std: expected positive numbers, got [0.5, 0.0, 0.5]"),
    ("data.scale=[0.5, 0.1]", "data.scale: expected low <= high, got [0.5, 0.1]"),
    ("data.ratio=[-1, 1]", "data.ratio: values must be >= 0.0, got [-1.0, 1.0]"),
    ("data.hflip=2", "data.hflip: expected a number in [0, 1], got 2.0"),
    ("data.canvas.canvas_size=3", "data.canvas.canvas_size: expected an int >= 4, got 3"),
    ("data.canvas.output_size=40", "data.canvas.output_size: expected null or an int in [1, canvas_size=32], got 40"),
    ("data.canvas.val_fraction=1", "data.canvas.val_fraction: expected a number in (0, 1), got 1.0"),
    ("data.video.num_frames=0", "data.video.num_frames: expected an int >= 1, got 0"),
    ("aug.mixup=-1", "aug.mixup: expected a number >= 0 (0 disables it), got -1.0"),
    ("aug.cutmix_minmax=[0.2, 1.5]", "aug.cutmix_minmax: values must be <= 1.0, got [0.2, 1.5]"),
    ("optim.betas=[0.9]", "optim.betas: expected null or two numbers, got [0.9]"),
    ("optim.layer_decay=0", "optim.layer_decay: expected null or a number in (0, 1], got 0.0"),
    ("optim.lr_scale={patch_embed.scorer: -1}", "optim.lr_scale: expected a number >= 0 for 'patch_embed.scorer' "
                                                "(its parameters train at optim.lr times it), got -1"),
    ("optim.lr_scale={.scorer: 1}", "optim.lr_scale: expected a mapping of parameter-name prefixes to numbers >= 0 "
                                    "(e.g. {patch_embed.scorer: 0.1}), got the key '.scorer'"),
    ("optim.lr_scale=3", "optim.lr_scale: expected a mapping, got 3 (int)"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: expected a number >= 0, got -0.1"),
    ("sched.warmup_epochs=3", "override 'sched.warmup_epochs=3': sched.warmup_epochs: must be below train.epochs=3, "
                              "got 3.0"),
    ("model.kwargs.drop_rate=0.1", "override 'model.kwargs.drop_rate=0.1': model.kwargs: ['drop_rate'] are set "
                                   "elsewhere (data.num_classes, model.drop_rate, model.drop_path_rate)"),
])
def test_bad_overrides_name_the_key(tiny_recipe, override, message):
    extra = ["train.batch_size=31"] if override.startswith("aug.mixup") else []
    with pytest.raises(ConfigError) as err:
        load_config(tiny_recipe, [*extra, override])
    assert message in str(err.value)


def test_unknown_key_in_a_file_names_the_file_and_lists_valid_keys(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", train={"warmup_epochs": 2})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: unknown key 'train.warmup_epochs'")
    assert "valid keys under train:" in text and "epochs" in text


def test_base_inheritance_merges_mappings_and_detects_cycles(tmp_path):
    base = write_recipe(tmp_path / "base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ntrain: {epochs: 9}\nmodel: {kwargs: {num_tokens: 4}}\n")
    cfg = load_config(str(child))
    assert cfg.train.epochs == 9 and cfg.train.batch_size == TINY_DART["train"]["batch_size"]
    assert cfg.model.kwargs["num_tokens"] == 4 and cfg.model.kwargs["embed_dim"] == 32
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path}/missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))
    assert base


def test_errors_in_a_file_name_the_file_that_set_the_key(tmp_path):
    base = write_recipe(tmp_path / "base.yaml", train={"epochs": "ten"})
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nmodel: {name: deit_tiny_dart, kwargs: {}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(child))
    assert str(err.value) == f"{base}: train.epochs: expected an int, got 'ten' (str)"
    child.write_text("_base_: base.yaml\ntrain: {epochs: 3, ema: {decai: 0.9}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(child))
    assert str(err.value).startswith(f"{child}: unknown key 'train.ema.decai' (did you mean 'train.ema.decay'?)")
    child.write_text("_base_: base.yaml\ntrain: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(child))
    assert str(err.value) == f"{child}: train: expected a mapping, got 3 (int)"


def test_an_empty_file_says_so(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(empty))
    assert str(err.value) == f"{empty}: the file is empty (expected a mapping of sections, e.g. train: {{epochs: 10}})"
    child = tmp_path / "child.yaml"
    child.write_text("_base_: empty.yaml\n")
    with pytest.raises(ConfigError, match=f"^{empty}: the file is empty"):
        load_config(str(child))


def test_number_fields_accept_what_the_old_schema_accepted():
    """ints and numeric strings for numbers (PyYAML reads 1e-3 as a string), tuples for lists, null for optionals."""
    cfg = config_from_dict({"data": {"kind": "canvas", "scale": (0.1, 1), "crop_pct": None},
                            "optim": {"lr": "1e-3", "weight_decay": 0}, "sched": {"warmup_epochs": 0}})
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.data.scale == [0.1, 1.0] and cfg.data.crop_pct is None
    with pytest.raises(ConfigError, match=r"^config: optim.lr: expected null or a number, got 'fast' \(str\)$"):
        config_from_dict({"data": {"kind": "canvas"}, "optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="^config: data.root: required when data.kind is 'imagefolder'"):
        config_from_dict({})


def test_recipes_load_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                        # no configs/ here: the names come from the package
    assert "vim_small_dart" in recipe_names() and "demo/vim_dart" in recipe_names()
    assert not any(name.startswith("base/") for name in recipe_names())
    by_name = load_config("demo/vim_dart")
    assert by_name == load_config("demo/vim_dart.yaml") == load_config(os.path.join(RECIPES, "demo", "vim_dart.yaml"))
    assert by_name.deepspeed.config == ds_json(0)        # set in ../base/demo_canvas.yaml, relative to that file
    assert load_config("vim_small_dart", ["data.root=/data/x"]).deepspeed.config == ds_json(1)
    with pytest.raises(ConfigError) as err:
        load_config("vim_smal_dart")
    assert str(err.value) == (f"config file not found: {tmp_path}/vim_smal_dart, nor a recipe named 'vim_smal_dart' "
                              f"(did you mean 'vim_small_dart'?); recipes: {', '.join(recipe_names())}")
    assert "\n" not in str(err.value)
    (tmp_path / "vim_small_dart.yaml").write_text(open(os.path.join(RECIPES, "vim_tiny_dart.yaml")).read())
    (tmp_path / "base").mkdir()
    shutil.copy(os.path.join(RECIPES, "base", "imagenet.yaml"), tmp_path / "base")
    assert load_config("vim_small_dart.yaml", ["data.root=x"]).model.name == "vim_tiny_dart"   # a file comes first


def test_a_missing_recipes_package_is_named(monkeypatch):
    import dartmamba_train.config as config

    monkeypatch.setattr(config, "RECIPES_PACKAGE", "dartmamba_no_such_configs")
    with pytest.raises(ConfigError, match="^the recipes package dartmamba_no_such_configs is not installed "
                                          r"\(reinstall dartmamba\)$"):
        load_config("vim_small_dart")


def test_paths_in_a_copied_recipe_resolve_beside_it(tmp_path, monkeypatch):
    mine, elsewhere = tmp_path / "myconfigs", tmp_path / "cwd"
    elsewhere.mkdir()
    shutil.copytree(RECIPES, mine, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    (mine / "deepspeed" / "zero0.json").write_text(json.dumps({"zero_optimization": {"stage": 0},
                                                               "steps_per_print": 7}))
    (elsewhere / "deepspeed").mkdir()
    (elsewhere / "deepspeed" / "zero0.json").write_text(json.dumps({"steps_per_print": 99}))
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(mine / "demo" / "vim_dart.yaml"), ["train.epochs=1"])
    assert cfg.deepspeed.config == str(mine / "deepspeed" / "zero0.json")
    assert build_deepspeed_config(cfg, 1)["steps_per_print"] == 7
    assert cfg.output.dir == "outputs/demo/vim_dart"   # an output: relative to the working directory


def test_paths_resolve_relative_to_the_file_that_sets_them(tmp_path, monkeypatch):
    (tmp_path / "bases").mkdir()
    (tmp_path / "recipes").mkdir()
    base = write_recipe(tmp_path / "bases" / "b.yaml", deepspeed={"config": "../json/z.json"},
                        model={"name": "deit_tiny_dart", "init_checkpoint": "w.safetensors",
                               "kwargs": {"dart_cfg": {"trunk_weights": "trunk/m.safetensors"},
                                          "checkpoint_path": "~/c.pth"}},
                        data={"root": "imagenet"})
    assert base
    child = tmp_path / "recipes" / "r.yaml"
    child.write_text("_base_: ../bases/b.yaml\nresume: ckpt/last\ndata: {kind: imagefolder, train_split: t}\n")
    monkeypatch.chdir(tmp_path / "recipes")
    cfg = load_config(str(child))
    assert cfg.deepspeed.config == str(tmp_path / "json" / "z.json")
    assert cfg.model.init_checkpoint == str(tmp_path / "bases" / "w.safetensors")
    assert cfg.model.kwargs == {"dart_cfg": {"trunk_weights": str(tmp_path / "bases" / "trunk" / "m.safetensors")},
                                "checkpoint_path": os.path.expanduser("~/c.pth")}
    assert cfg.data.root == str(tmp_path / "bases" / "imagenet")
    assert cfg.resume == str(tmp_path / "recipes" / "ckpt" / "last")
    # overrides are relative to the working directory; keywords stay keywords
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(child), ["deepspeed.config=ds.json", "resume=auto", "data.root=/abs/root",
                                   "model.kwargs.dart_cfg.trunk_weights=pretrained", "model.init_checkpoint=../w.pt"])
    assert (cfg.deepspeed.config, cfg.resume, cfg.data.root, cfg.model.kwargs["dart_cfg"]["trunk_weights"],
            cfg.model.init_checkpoint) == (str(tmp_path / "ds.json"), "auto", "/abs/root", "pretrained",
                                           str(tmp_path.parent / "w.pt"))
    # config_from_dict: relative to the working directory too
    assert config_from_dict({"data": {"root": "d"}}).data.root == str(tmp_path / "d")
    # a saved config holds them absolute and loads back the same from anywhere
    save_config(cfg, str(tmp_path / "saved.yaml"))
    monkeypatch.chdir(tmp_path / "bases")
    assert load_config(str(tmp_path / "saved.yaml")) == cfg


def test_override_values_are_read_as_yaml():
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=1.5e-3") == (["a"], 1.5e-3)
    assert parse_override("a=1e-3") == (["a"], "1e-3")      # PyYAML; float fields accept it (first test)
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a=") == (["a"], "")


def test_saved_config_round_trips(tmp_path, tiny_recipe):
    cfg = load_config(tiny_recipe, ["train.epochs=5", "model.kwargs.num_tokens=9"])
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert [p for p in os.listdir(path.parent) if p != "config.yaml"] == []     # no temp file left behind
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_loads_and_builds_its_model(recipe):
    import torch

    from dartmamba_train.engine import create_model

    overrides = ["data.root=/data/imagenet"] if "/" not in recipe else []
    cfg = load_config(recipe, overrides)
    assert os.path.dirname(cfg.deepspeed.config) == os.path.join(RECIPES, "deepspeed")
    ds = build_deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == cfg.train.batch_size * cfg.train.grad_accum * 8
    with torch.device("meta"):                           # arguments checked, no memory spent
        model = create_model(cfg, 1000)
    from dartmamba_train.data import model_data_config

    expected = cfg.data.img_size or (cfg.data.canvas.output_size or cfg.data.canvas.canvas_size)
    assert model_data_config(model)["input_size"] == (3, expected, expected)
    if cfg.data.kind == "imagefolder":
        assert (cfg.optim.lr, cfg.optim.lr_base, cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.smoothing, cfg.data.reprob,
                cfg.train.epochs, cfg.sched.warmup_epochs, cfg.train.ema.enabled) == \
            (None, 5e-4, 0.8, 1.0, 0.1, 0.25, 300, 5.0, True)      # the paper's (DeiT's) recipe


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_is_filled_from_the_run(tiny_recipe, stage):
    cfg = load_config(tiny_recipe, [f"deepspeed.config={ds_json(stage)}", "train.grad_accum=3",
                                    "train.clip_grad=1.5", "train.precision=amp_bf16"])
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == stage
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (32, 3, 192)
    assert ds["gradient_clipping"] == 1.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    cfg = load_config(tiny_recipe, ["train.precision=bf16", "deepspeed.stage=2", "train.clip_grad=null"])
    ds = build_deepspeed_config(cfg, world_size=1)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.0


def test_zero3_memory_efficient_linear_is_off_unless_asked(tiny_recipe):
    cfg = load_config(tiny_recipe, [f"deepspeed.config={ds_json(3)}"])
    assert build_deepspeed_config(cfg, 1)["zero_optimization"]["memory_efficient_linear"] is False
    cfg = load_config(tiny_recipe, [f"deepspeed.config={ds_json(3)}",
                                    "deepspeed.overrides={zero_optimization: {memory_efficient_linear: true}}"])
    assert build_deepspeed_config(cfg, 1)["zero_optimization"]["memory_efficient_linear"] is True


@pytest.mark.parametrize("content, message", [
    ({"optimizer": {"type": "Adam"}}, "declares an 'optimizer'; remove it"),
    ({"train_batch_size": 64}, "sets train_batch_size=64; batch sizes come from train.batch_size"),
    ({"fp16": {"enabled": True}}, "sets 'fp16'; precision comes from train.precision"),
])
def test_deepspeed_json_conflicts_are_refused(tmp_path, tiny_recipe, content, message):
    path = tmp_path / "ds.json"
    path.write_text(yaml.safe_dump(content))    # JSON is YAML's subset the other way round; write real JSON
    import json
    path.write_text(json.dumps(content))
    cfg = load_config(tiny_recipe, [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_deepspeed_config(cfg, 1)
    cfg = load_config(tiny_recipe, ["deepspeed.config=nope/zero9.json"])
    with pytest.raises(ConfigError, match=f"deepspeed.config: file not found: {os.getcwd()}/nope/zero9.json"):
        build_deepspeed_config(cfg, 1)


def test_cli_reports_config_errors_before_any_work(tmp_path, tiny_recipe, capsys):
    out_dir = tmp_path / "run"
    assert main(["--config", tiny_recipe, f"output.dir={out_dir}", "train.epocs=2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("dartmamba-train: config error: override 'train.epocs=2': unknown key 'train.epocs' "
                           "(did you mean 'train.epochs'?); valid keys under train: " + ", ".join(sorted(
                               ["epochs", "batch_size", "eval_batch_size", "grad_accum", "clip_grad", "precision",
                                "compile", "compile_scope", "compile_backend", "compile_mode", "seed",
                                "steps_per_epoch", "log_interval", "eval_interval", "save_interval", "keep_last",
                                "nonfinite", "preempt_signals", "preempt_requeue", "ema"])))
    assert not out_dir.exists()


def test_cli_names_a_missing_data_directory(tmp_path, tiny_recipe, capsys):
    out_dir = tmp_path / "run"
    missing = tmp_path / "no_such_dataset"
    assert main(["--config", tiny_recipe, f"output.dir={out_dir}", "data.kind=imagefolder",
                 f"data.root={missing}"]) == 2
    assert capsys.readouterr().err.strip() == f"dartmamba-train: data.root: data directory not found: {missing}"
    (missing / "train").mkdir(parents=True)
    assert main(["--config", tiny_recipe, f"output.dir={out_dir}", "data.kind=imagefolder",
                 f"data.root={missing}", "data.val_split=validation"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dartmamba-train: data.val_split: split folder not found: {missing}/validation (expected {missing}/<split>/"
        f"<class>/<image> with one sub-folder per class)")
    assert not out_dir.exists()


def test_print_config_shows_the_resolved_values(tiny_recipe, capsys):
    assert main(["--config", tiny_recipe, "--print-config", "train.epochs=11"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 11 and printed["model"]["name"] == "deit_tiny_dart"


def test_canvas_and_model_sizes_must_agree(tiny_recipe):
    import timm

    import dartmamba.models  # noqa: F401
    from dartmamba_train.data import build_data, model_data_config

    cfg = load_config(tiny_recipe, ["data.canvas.output_size=16"])
    model = timm.create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    with pytest.raises(ConfigError) as err:
        build_data(cfg, model_data_config(model))
    assert str(err.value) == ("data.canvas.output_size: the canvases are 16x16 but the model takes 32x32 input; make "
                              "model.kwargs.img_size (and data.img_size if set) agree with data.canvas.output_size "
                              "(or canvas_size)")
    bundle = build_data(load_config(tiny_recipe), model_data_config(model))
    assert bundle.input_size == (3, 32, 32) and bundle.val_set[0][0].shape == (3, 32, 32)


def test_lr_scale_and_layer_decay_do_not_combine(tiny_recipe):
    assert load_config(tiny_recipe, ["optim.lr_scale={patch_embed.scorer: 0.1}"]).optim.lr_scale == {
        "patch_embed.scorer": 0.1}
    with pytest.raises(ConfigError) as err:
        load_config(tiny_recipe, ["optim.layer_decay=0.75", "optim.lr_scale={patch_embed.scorer: 0.1}"])
    assert ("optim.lr_scale: cannot be combined with optim.layer_decay (each sets per-parameter learning rates); "
            "use one") in str(err.value)
