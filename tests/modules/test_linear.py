"""OutputPaddedLinear: nn.Linear's parameters, state dict, values and gradients, with the CPU product on a weight
padded to a multiple of pad_to outputs; Vim's x_proj is one."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from dartmamba.modules.linear import OutputPaddedLinear


@pytest.mark.parametrize("out_features, bias", [(44, False), (56, True), (48, False), (1, True)])
def test_values_and_gradients_are_nn_linears(seed, out_features, bias):
    layer = OutputPaddedLinear(96, out_features, bias=bias)
    plain = nn.Linear(96, out_features, bias=bias)
    plain.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == list(plain.state_dict())
    assert layer.weight.shape == (out_features, 96)
    x = torch.randn(3, 37, 96, dtype=torch.float64)
    layer.double(), plain.double()
    with torch.no_grad():                        # the padded product (inference): the same dot products
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-13, atol=1e-13)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = layer(x1), plain(x2)
    assert out.shape == ref.shape == (3, 37, out_features)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=1e-13, atol=1e-13)
    if bias:
        torch.testing.assert_close(layer.bias.grad, plain.bias.grad, rtol=1e-13, atol=1e-13)


def test_the_cpu_product_runs_on_the_padded_weight():
    """The GEMM torch runs has the padded width for CPU inference (what makes it faster), the plain one with
    autograd (training; the FLOP counter) and elsewhere (meta)."""
    layer = OutputPaddedLinear(64, 44, bias=False)
    assert layer.padded_features() == 48
    shapes = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                shapes.append(tuple(args[1].shape))
            return func(*args, **(kwargs or {}))

    with Record():
        with torch.inference_mode():
            out = layer(torch.randn(5, 64))
        with torch.no_grad():
            layer(torch.randn(5, 64))
        layer(torch.randn(5, 64))
        layer.to("meta")(torch.randn(5, 64, device="meta"))
    assert shapes == [(48, 64), (48, 64), (44, 64), (44, 64)]
    assert out.shape == (5, 44) and out.stride() == (48, 1)          # a view of the padded product


def test_pad_to_is_checked():
    with pytest.raises(ValueError, match="pad_to must be an int >= 1, got 0"):
        OutputPaddedLinear(8, 4, pad_to=0)
    assert OutputPaddedLinear(8, 17, pad_to=8).padded_features() == 24
    assert "pad_to=16" in repr(OutputPaddedLinear(8, 4))


def test_vim_x_proj_is_padded_and_loads_as_linear():
    model = timm.create_model("vim_tiny_patch16_224", pretrained=False, depth=2)
    x_proj = model.layers[0].mixer.x_proj
    assert isinstance(x_proj, OutputPaddedLinear) and isinstance(x_proj, nn.Linear)
    assert (x_proj.out_features, x_proj.padded_features()) == (44, 48)       # dt_rank 12 + 2 x 16
    assert model.state_dict()["layers.0.mixer.x_proj.weight"].shape == (44, 384)
