"""The DeepSpeed engine in one process (in-process gloo group): ZeRO 0-3 x precisions train, the timm optimizer and
scheduler drive the updates, compiled steps match eager ones, consolidated weights are the fp32 masters."""
from __future__ import annotations

import pytest
import torch

from dartmamba_train.config import load_config
from dartmamba_train.engine import (build_deepspeed_config, consolidated_state_dict, create_model, create_optimizer,
                                    create_scheduler, gathered_params, initialize_engine, train_micro_step)

from tests.train.train_helpers import canvas_batch, make_engine, train_steps, write_recipe

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def batch():
    """A fixed batch of 16 canvases (32x32) and labels."""
    return canvas_batch()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp_bf16"])
def test_zero_stages_and_precisions_lower_the_loss(tmp_path, dist_group, batch, stage, precision):
    cfg, parts = make_engine(tmp_path, [f"deepspeed.stage={stage}", f"train.precision={precision}"])
    with gathered_params(parts.engine, stage):
        dtypes = {p.dtype for p in parts.engine.module.parameters()}
    assert dtypes == ({torch.bfloat16} if precision == "bf16" else {torch.float32})
    losses = train_steps(cfg, parts, batch, 8)
    assert losses[-1] < losses[0] - 0.15, losses
    assert parts.engine.global_steps == 8


def test_precisions_change_the_arithmetic_but_not_the_start(tmp_path, dist_group, batch):
    first = {p: train_steps(*make_engine(tmp_path, [f"train.precision={p}"]), batch, 1)[0]
             for p in ("fp32", "bf16", "amp_bf16")}
    assert first["fp32"] != first["bf16"] and first["fp32"] != first["amp_bf16"]
    assert abs(first["bf16"] - first["fp32"]) < 0.05 and abs(first["amp_bf16"] - first["fp32"]) < 0.05


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_timm_optimizer_lr_drives_deepspeed_updates(tmp_path, dist_group, batch, stage):
    """What the timm scheduler writes into the timm optimizer's param groups is what DeepSpeed applies: lr 0 leaves
    the weights (AdamW's decay is scaled by lr too) unchanged, a positive lr moves them."""
    cfg, parts = make_engine(tmp_path, [f"deepspeed.stage={stage}", "sched.warmup_epochs=1", "sched.warmup_lr=0.0"])
    assert parts.scheduler.optimizer is parts.optimizer
    assert [g["lr"] for g in parts.optimizer.param_groups] == [0.0] * len(parts.optimizer.param_groups)
    assert parts.engine.get_lr()[0] == 0.0
    before = consolidated_state_dict(parts)
    train_steps(cfg, parts, batch, 1)
    after = consolidated_state_dict(parts)
    assert all(torch.equal(before[k], after[k]) for k in before)
    parts.scheduler.step_update(5)            # half-way through the warmup: lr = 3e-3 / 2
    assert parts.engine.get_lr()[0] == pytest.approx(1.5e-3)
    train_steps(cfg, parts, batch, 1)
    moved = consolidated_state_dict(parts)
    assert not torch.equal(moved["head.weight"], after["head.weight"])


SCALES = "optim.lr_scale={patch_embed.scorer: 0, patch_embed: 2, head: 0.5}"


def test_lr_scale_groups_keep_timm_weight_decay_split(tmp_path):
    """The scorer's parameters get lr_scale 0, the rest of patch_embed 2 (the longest prefix wins), the head 0.5,
    everything else 1; every parameter keeps the weight decay timm's own grouping gives it."""
    cfg = load_config(write_recipe(tmp_path / "r.yaml"), [SCALES])
    model = create_model(cfg, 10)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = create_optimizer(cfg, model, 1).param_groups
    plain = create_optimizer(load_config(write_recipe(tmp_path / "p.yaml")), model, 1).param_groups
    scale_of = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of == {names[id(p)]: g["weight_decay"] for g in plain for p in g["params"]}
    assert set(scale_of) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, scale in scale_of.items():
        expected = (0.0 if name.startswith("patch_embed.scorer.") else 2.0 if name.startswith("patch_embed.")
                    else 0.5 if name.startswith("head.") else 1.0)
        assert scale == expected, name


@pytest.mark.parametrize("stage", [0, 2])
def test_lr_scale_sets_the_learning_rate_of_the_parameters_it_names(tmp_path, dist_group, batch, stage):
    """DeepSpeed (ZeRO 0 and 2) applies what timm's scheduler writes per group, lr times lr_scale: an update leaves
    the DART scorer (scale 0) as it was, AdamW's decay included, and moves the head and the patch projection."""
    cfg, parts = make_engine(tmp_path, [f"deepspeed.stage={stage}", SCALES])
    parts.scheduler.step_update(3)
    assert sorted({g["lr_scale"] for g in parts.optimizer.param_groups}) == [0.0, 0.5, 1.0, 2.0]
    for group in parts.optimizer.param_groups:
        assert group["lr"] == pytest.approx(3e-3 * group["lr_scale"], rel=0.2)
        assert (group["lr"] > 0) == (group["lr_scale"] > 0)
    before = consolidated_state_dict(parts)
    train_steps(cfg, parts, batch, 1)
    after = consolidated_state_dict(parts)
    scorer = [k for k in before if k.startswith("patch_embed.scorer.") and before[k].is_floating_point()
              and "running_" not in k]
    assert scorer and all(torch.equal(before[k], after[k]) for k in scorer)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["patch_embed.proj.weight"], after["patch_embed.proj.weight"])


def test_lr_scale_naming_no_parameter_is_a_clear_error(tmp_path):
    from dartmamba_train.config import ConfigError

    cfg = load_config(write_recipe(tmp_path / "r.yaml"), ["optim.lr_scale={patch_embed.scorer: 0.1, scorer: 0}"])
    model = create_model(cfg, 10)
    with pytest.raises(ConfigError, match=r"optim.lr_scale: 'scorer' is the prefix of no trainable parameter of the "
                                          r"model \(its top-level parts with trainable parameters: blocks, cls_token, "
                                          r"head, norm, patch_embed, pos_embed\)"):
        create_optimizer(cfg, model, 1)


def test_no_weight_decay_on_norms_biases_embeddings_and_tokens(tmp_path):
    vim = {"name": "vim_tiny_dart", "kwargs": {"img_size": 32, "patch_size": 8, "grid_size": 4, "num_tokens": 16,
                                               "embed_dim": 32, "depth": 2, "dart_cfg": {"trunk": "tiny_cnn"}}}
    cfg = load_config(write_recipe(tmp_path / "r.yaml", model=vim))
    model = create_model(cfg, 10)
    optimizer = create_optimizer(cfg, model, 1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "norm_f.weight", "layers.0.norm.weight", "layers.0.mixer.A_log",
            "layers.0.mixer.A_b_log", "layers.0.mixer.D", "head.bias", "patch_embed.proj.bias"} <= no_decay
    assert {"head.weight", "patch_embed.proj.weight", "layers.0.mixer.in_proj.weight",
            "layers.1.mixer.out_proj.weight"} <= decay
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}


def test_cpu_adamw_is_fused_and_steps_as_the_loop_implementation(tmp_path, seeds):
    """On CPU parameters AdamW takes torch's fused kernel; its updates equal the per-tensor loop's (torch's
    reference implementation) over a few steps, every parameter group included. Both optimizers get the same
    gradients at every step (the fused model's, copied), so only their arithmetic differs: float32 rounding of
    updates ~lr = 1e-3 (recomputing each model's own gradients let Adam's normalisation blow the models' rounding
    drift up in near-zero gradients, past 1e-5 in one element of 18,432 once)."""
    vim = {"name": "vim_tiny_dart", "kwargs": {"img_size": 32, "patch_size": 8, "grid_size": 4, "num_tokens": 16,
                                               "embed_dim": 32, "depth": 2, "dart_cfg": {"trunk": "tiny_cnn"}}}
    cfg = load_config(write_recipe(tmp_path / "r.yaml", model=vim))
    fused_model = create_model(cfg, 10)
    loop_model = create_model(cfg, 10)
    loop_model.load_state_dict(fused_model.state_dict())
    fused = create_optimizer(cfg, fused_model, 1)
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    loop = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"},
                               "params": [dict(loop_model.named_parameters())[n] for n in
                                          [{id(p): n for n, p in fused_model.named_parameters()}[id(q)]
                                           for q in g["params"]]],
                               "fused": False, "foreach": False} for g in fused.param_groups])
    for group in (*fused.param_groups, *loop.param_groups):      # decay large enough to show in 3 steps
        group["weight_decay"] = 10 * group["weight_decay"]
    assert any(group["weight_decay"] > 0 for group in fused.param_groups)
    g = torch.Generator().manual_seed(seeds[0])
    for _ in range(3):
        images = torch.randn(4, 3, 32, 32, generator=g)
        fused.zero_grad()
        loop.zero_grad()
        fused_model(images).square().mean().backward()
        for a, b in zip(fused_model.parameters(), loop_model.parameters()):
            b.grad = None if a.grad is None else a.grad.clone()
        fused.step()
        loop.step()
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage, scope", [(0, "model"), (3, "blocks")])
def test_compiled_and_eager_steps_agree(tmp_path, dist_group, batch, stage, scope):
    # SGD: updates proportional to the gradients (Adam's normalisation would blow rounding noise in near-zero
    # gradients up to +-lr per step and hide what is compared)
    common = [f"deepspeed.stage={stage}", "model.kwargs.depth=1", "optim.opt=sgd", "optim.lr=0.05"]
    cfg, eager = make_engine(tmp_path, common)
    cfg_c, compiled = make_engine(tmp_path, [*common, "train.compile=true", f"train.compile_scope={scope}"])
    assert eager.compile_scope is None and compiled.compile_scope == scope
    assert compiled.engine.is_compiled == (scope == "model")
    eager_losses = train_steps(cfg, eager, batch, 4)
    compiled_losses = train_steps(cfg_c, compiled, batch, 4)
    assert eager_losses[-1] < eager_losses[0]
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    a, b = consolidated_state_dict(eager), consolidated_state_dict(compiled)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_zero3_engine_leaves_torch_linear_alone(tmp_path, dist_group):
    """DeepSpeed's ZeRO-3 "memory-efficient linear" would replace torch.nn.functional.linear process-wide (and with
    torch 2.11 lose the gradients inside compiled regions); the engine turns it off, so the builtin stays."""
    builtin = torch._C._nn.linear
    assert torch.nn.functional.linear is builtin
    cfg, parts = make_engine(tmp_path, ["deepspeed.stage=3", "model.kwargs.depth=1"])
    assert parts.zero_stage == 3
    assert torch.nn.functional.linear is builtin


def test_whole_model_compile_is_refused_under_zero3(tmp_path, dist_group):
    from dartmamba_train.config import ConfigError

    with pytest.raises(ConfigError, match="train.compile_scope: 'model' does not work under ZeRO-3"):
        make_engine(tmp_path, ["deepspeed.stage=3", "train.compile=true", "train.compile_scope=model"])


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_consolidated_weights_are_fp32_masters_and_frozen_originals(tmp_path, dist_group, batch, stage):
    """bf16 engines keep bf16 weights in the module and fp32 masters in the optimizer: the consolidated state holds
    the masters (the module's weights are their bf16 rounding) and the frozen tensors' original fp32 values."""
    cfg, parts = make_engine(tmp_path, [f"deepspeed.stage={stage}", "train.precision=bf16"],
                             freeze="patch_embed.scorer.trunk")
    original = {k: v.clone() for k, v in parts.frozen.tensors.items()}
    train_steps(cfg, parts, batch, 2)
    state = consolidated_state_dict(parts)
    with gathered_params(parts.engine, stage):
        module = {k: v.detach().clone() for k, v in parts.engine.module.state_dict().items()}
    assert state.keys() == module.keys()
    assert all(v.dtype == torch.float32 for v in state.values())
    frozen = [k for k in state if k.startswith("patch_embed.scorer.trunk")]
    assert frozen and all(torch.equal(state[k], original[k]) for k in frozen)
    assert any(not torch.equal(state[k], module[k].float()) for k in frozen)      # the module's copy is bf16
    trainable = [n for n, p in parts.engine.module.named_parameters() if p.requires_grad]
    for key in trainable:
        torch.testing.assert_close(state[key].to(torch.bfloat16), module[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(state[k], module[k].float()) for k in trainable)   # masters carry more bits


def test_consolidated_fp32_stage0_is_the_module_state(tmp_path, dist_group, batch):
    cfg, parts = make_engine(tmp_path, ["deepspeed.stage=0"])
    train_steps(cfg, parts, batch, 2)
    state = consolidated_state_dict(parts)
    module = parts.engine.module.state_dict()
    assert list(state) == list(module)
    assert all(torch.equal(state[k], module[k]) for k in state)


def _flat_trainable(state, parts):
    names = [n for n, p in parts.engine.module.named_parameters() if p.requires_grad]
    return torch.cat([state[n].flatten() for n in names])


@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_accumulation_equals_the_big_batch(tmp_path, dist_group, batch, stage):
    """Two micro-batches of 8 with grad_accum=2 make the same update as one batch of 16 (mean loss)."""
    sgd = ["optim.opt=momentum", "optim.lr=0.1", "optim.momentum=0", "optim.weight_decay=0", f"deepspeed.stage={stage}"]
    cfg_big, big = make_engine(tmp_path, sgd)
    cfg_acc, acc = make_engine(tmp_path, [*sgd, "train.batch_size=8", "train.grad_accum=2"])
    start = consolidated_state_dict(big)
    assert all(torch.equal(start[k], v) for k, v in consolidated_state_dict(acc).items())
    loss_fn = torch.nn.CrossEntropyLoss()
    train_micro_step(big.engine, batch[0], batch[1], loss_fn, cfg_big)
    for half in (slice(0, 8), slice(8, 16)):
        train_micro_step(acc.engine, batch[0][half], batch[1][half], loss_fn, cfg_acc)
    assert big.engine.global_steps == acc.engine.global_steps == 1
    a, b = _flat_trainable(consolidated_state_dict(big), big), _flat_trainable(consolidated_state_dict(acc), acc)
    assert not torch.equal(a, _flat_trainable(start, big))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_gradient_clipping_bounds_the_update(tmp_path, dist_group, batch, stage):
    """Plain SGD with train.clip_grad=c moves the weights by exactly lr * c in norm (the gradient norm exceeds c)."""
    cfg, parts = make_engine(tmp_path, ["optim.opt=momentum", "optim.lr=0.5", "optim.momentum=0", "optim.weight_decay=0",
                                        "train.clip_grad=0.01", f"deepspeed.stage={stage}"])
    before = _flat_trainable(consolidated_state_dict(parts), parts)
    train_steps(cfg, parts, batch, 1)
    after = _flat_trainable(consolidated_state_dict(parts), parts)
    # the unclipped gradients are far larger (the loss starts near ln 10 with random weights), so an update of
    # norm exactly lr * c is the clipping at work
    assert (after - before).norm().item() == pytest.approx(0.5 * 0.01, rel=1e-3)


def test_losses_follow_the_aug_section(tmp_path):
    import numpy as np
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from dartmamba_train.engine import create_losses

    recipe = write_recipe(tmp_path / "r.yaml")
    mixup, loss = create_losses(load_config(recipe, ["aug.mixup=0.8", "aug.cutmix=1.0", "aug.smoothing=0.1"]), 10)
    assert isinstance(loss, SoftTargetCrossEntropy) and (mixup.mixup_alpha, mixup.cutmix_alpha) == (0.8, 1.0)
    np.random.seed(0)
    images, targets = mixup(torch.randn(4, 3, 8, 8), torch.arange(4))
    assert targets.shape == (4, 10)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    assert targets.min() >= 0.1 / 10 - 1e-7                    # smoothing folded into the soft targets
    mixup, loss = create_losses(load_config(recipe, ["aug.smoothing=0.1"]), 10)
    assert mixup is None and isinstance(loss, LabelSmoothingCrossEntropy) and loss.smoothing == 0.1
    mixup, loss = create_losses(load_config(recipe, ["aug.smoothing=0.0"]), 10)
    assert mixup is None and isinstance(loss, torch.nn.CrossEntropyLoss)


@pytest.mark.parametrize("stage", [0, 3])
def test_ema_tracks_the_full_weights_under_every_stage(tmp_path, dist_group, batch, stage):
    """ModelEmaV3 updated as the loop does (inside gathered_params): after updates at steps 1 and 2 with decay 0.5,
    the EMA is the mean of the weights after step 1 and after step 2 (step 1 copies, timm's convention)."""
    from timm.utils import ModelEmaV3

    cfg = load_config(write_recipe(tmp_path / "r.yaml"), ["optim.lr=3e-3", "train.batch_size=16",
                                                          f"deepspeed.stage={stage}"])
    torch.manual_seed(0)
    model = create_model(cfg, 10)
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = create_optimizer(cfg, model, 1)
    parts = initialize_engine(cfg, model, optimizer, create_scheduler(cfg, optimizer, 10),
                              build_deepspeed_config(cfg, 1))
    snapshots = []
    for step in (1, 2):
        train_steps(cfg, parts, batch, 1)
        with gathered_params(parts.engine, stage):
            ema.update(parts.engine.module, step=step)
        snapshots.append(consolidated_state_dict(parts))
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, (snapshots[0][name] + snapshots[1][name]) / 2, rtol=1e-6, atol=1e-7,
                                   msg=name)
