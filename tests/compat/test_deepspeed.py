"""The DeepSpeed shims of dartmamba.compat.deepspeed: each test names the shim whose DeepSpeed internal changed."""
from __future__ import annotations

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from dartmamba.compat import deepspeed as shims  # noqa: E402


def test_disable_cpu_shm_comm_keeps_deepspeed_from_building_the_op():
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the shared-memory comm op is DeepSpeed's CPU accelerator's")
    import importlib

    import deepspeed.ops

    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")   # deepspeed.comm.torch is also torch itself

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder is not None and isinstance(builder.NAME, str), (
        "shim disable_cpu_shm_comm: DeepSpeed's CPU accelerator no longer makes a 'ShareMemCommBuilder'")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    assert isinstance(compatible, dict) and builder.NAME in compatible, (
        f"shim disable_cpu_shm_comm: deepspeed.ops.__compatible_ops__ is no longer a dict holding {builder.NAME!r}")
    assert shims.disable_cpu_shm_comm() is True
    assert compatible[builder.NAME] is False
    assert ds_comm_torch.build_shm_op() is None, (
        "shim disable_cpu_shm_comm: DeepSpeed's build_shm_op no longer reads deepspeed.ops.__compatible_ops__")


def test_recorded_config_keys_are_the_keys_deepspeed_reads():
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 1}, "bogus_key": 1}
    before = {key: (dict(value) if isinstance(value, dict) else value) for key, value in ds.items()}
    seen = shims.recorded_config_keys(ds)
    assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
            "zero_optimization", "bf16", "fp16"} <= seen, (
        f"shim recorded_config_keys: DeepSpeedConfig no longer looks keys up in the mapping it is given (saw "
        f"{sorted(seen)})")
    assert "bogus_key" not in seen
    assert set(shims.READ_BY_INITIALIZE) <= seen
    assert ds == before                                  # the caller's dict is not touched


def test_recorded_config_keys_lets_deepspeeds_errors_through():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="stagee"):
        shims.recorded_config_keys({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stagee": 1}})


def test_config_models_are_deepspeeds_pydantic_sections():
    import pydantic

    models = shims.config_models()
    assert all(issubclass(m, pydantic.BaseModel) for m in models)
    zero = [m for m in models if {"stage", "overlap_comm", "offload_optimizer"} <= set(m.model_fields)]
    assert zero, "shim config_models: no DeepSpeedConfigModel subclass holds the zero_optimization fields"


@pytest.fixture
def dist_group():
    from dartmamba_train.distributed import init_distributed

    return init_distributed()


def test_unfused_master_copies_are_the_bf16_zero0_optimizers_fp32_masters(tmp_path, dist_group):
    from tests.train.train_helpers import make_engine

    _, parts = make_engine(tmp_path, ["deepspeed.stage=0", "train.precision=bf16"])
    masters = shims.unfused_master_copies(parts.engine.optimizer)
    trainable = [p for p in parts.engine.module.parameters() if p.requires_grad]
    assert trainable and set(masters) == {id(p) for p in trainable}, (
        f"shim unfused_master_copies: {type(parts.engine.optimizer).__name__} no longer keeps fp16_groups / "
        f"fp32_groups that pair the module's parameters with fp32 masters")
    for param in trainable:
        master = masters[id(param)]
        assert param.dtype == torch.bfloat16 and master.dtype == torch.float32
        torch.testing.assert_close(master.to(torch.bfloat16), param.detach(), rtol=0, atol=0)
    assert shims.unfused_master_copies(torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)) == {}
