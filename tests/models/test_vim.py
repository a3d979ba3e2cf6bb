"""Vision Mamba: architecture facts, an independent slow reference, DART identity, backends, tracing."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import dartmamba.models  # noqa: F401  (registers the models)
from dartmamba import backends
from dartmamba.models.checkpoints import transfer_fixed_grid_weights
from dartmamba.ops import selective_scan_reference

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=5)
TINY_DART = dict(img_size=64, patch_size=8, grid_size=4, num_tokens=12, embed_dim=32, depth=2, num_classes=5,
                 dart_cfg=dict(trunk="tiny_cnn"))


def reference_forward(model, images):
    """Vim written out with plain torch ops and the sequential reference scan, from the model's parameters only."""
    tokens = F.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.patch_embed.proj.stride)
    tokens = tokens.flatten(2).transpose(1, 2)
    middle = tokens.shape[1] // 2
    x = torch.cat([tokens[:, :middle], model.cls_token.expand(len(images), -1, -1), tokens[:, middle:]], 1)
    x = x + model.pos_embed

    def rmsnorm(t, weight, eps):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    def branch(mixer, x_in, z_in, suffix):
        conv = getattr(mixer, "conv1d" + suffix)
        seq_len = x_in.shape[-1]
        h = F.conv1d(x_in, conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1, groups=x_in.shape[1])
        h = F.silu(h[..., :seq_len])
        proj = getattr(mixer, "x_proj" + suffix).weight @ h                                     # (B, R+2N, L)
        dt, b_in, c_in = proj.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=1)
        dt_proj = getattr(mixer, "dt_proj" + suffix)
        delta = torch.einsum("dr,brl->bdl", dt_proj.weight, dt)
        a_log = mixer.A_log if suffix == "" else mixer.A_b_log
        d_skip = mixer.D if suffix == "" else mixer.D_b
        return selective_scan_reference(h, delta, -torch.exp(a_log), b_in, c_in, d_skip, z=z_in,
                                        delta_bias=dt_proj.bias, delta_softplus=True)

    residual = None
    hidden = x
    for layer in model.layers:
        residual = hidden if residual is None else residual + hidden
        normed = rmsnorm(residual, layer.norm.weight, layer.norm.eps)
        mixer = layer.mixer
        xz = (normed @ mixer.in_proj.weight.t()).transpose(1, 2)
        x_in, z_in = xz.chunk(2, dim=1)
        y = branch(mixer, x_in, z_in, "") + branch(mixer, x_in.flip(-1), z_in.flip(-1), "_b").flip(-1)
        hidden = (y / 2).transpose(1, 2) @ mixer.out_proj.weight.t()
    out = rmsnorm(residual + hidden, model.norm_f.weight, model.norm_f.eps)
    return out[:, middle] @ model.head.weight.t() + model.head.bias


@pytest.mark.parametrize("scan_backend", ["torch", "reference"])
def test_small_vim_matches_independent_reference_composition(scan_backend, seed):
    model = timm.create_model("vim_tiny_patch16_224", **TINY).double().eval()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with backends.use_backend("scan", scan_backend):
        got = model(images)
    torch.testing.assert_close(got, reference_forward(model, images), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scan_backend", ["torch", "reference"])
@pytest.mark.parametrize("name", ["A_b_log", "D_b", "dt_proj_b.bias", "x_proj_b.weight", "conv1d_b.weight"])
def test_backward_branch_parameters_change_the_output(scan_backend, name, seed):
    """Both scan directions run on every backend (Vim's own slow path silently drops the backward one)."""
    mixer = timm.create_model("vim_tiny_patch16_224", **TINY).layers[0].mixer
    hidden = torch.randn(2, 17, 32)
    with backends.use_backend("scan", scan_backend), torch.no_grad():
        before = mixer(hidden)
        param = mixer.get_parameter(name)
        param.add_(torch.randn_like(param))
        after = mixer(hidden)
    change = (after - before).abs().max() / before.abs().max()
    assert change > 1e-5, f"{name} has no effect under the {scan_backend} backend (relative change {change:.2e})"


def test_hustvl_checkpoint_layout_and_parameter_counts():
    """415 tensors, the official names and shapes, and the published totals (notes, section 5)."""
    expected_totals = {"tiny": 7_148_008, "small": 25_796_584, "base": 97_598_440}
    for size, total in expected_totals.items():
        with torch.device("meta"):
            model = timm.create_model(f"vim_{size}_patch16_224")
        state = model.state_dict()
        assert len(state) == 415, size
        assert sum(t.numel() for t in state.values()) == total, size
        dim = model.embed_dim
        dt_rank = math.ceil(dim / 16)
        assert state["pos_embed"].shape == (1, 197, dim) and state["cls_token"].shape == (1, 1, dim)
        assert state["layers.23.mixer.x_proj_b.weight"].shape == (dt_rank + 32, 2 * dim)
        assert state["layers.0.mixer.A_b_log"].shape == (2 * dim, 16)
        assert state["layers.0.mixer.in_proj.weight"].shape == (4 * dim, dim)
        assert "layers.0.mixer.in_proj.bias" not in state and "layers.0.mixer.out_proj.bias" not in state
        assert state["layers.5.mixer.conv1d_b.weight"].shape == (2 * dim, 1, 4)
        assert state["norm_f.weight"].shape == (dim,)


def test_init_gives_both_branches_a_proper_dt_and_rescaled_out_proj(seed):
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=4)
    for layer in model.layers:
        for bias in (layer.mixer.dt_proj.bias, layer.mixer.dt_proj_b.bias):
            dt = F.softplus(bias)
            assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
            assert dt.std() > 1e-3                       # not one constant value (Vim's accidental 0.69)
        torch.testing.assert_close(layer.mixer.A_b_log[0], torch.log(torch.arange(1.0, 17.0)))
        assert torch.equal(layer.mixer.D_b, torch.ones_like(layer.mixer.D_b))
        bound = 1 / math.sqrt(layer.mixer.d_inner) / math.sqrt(4)
        assert layer.mixer.out_proj.weight.abs().max() <= bound * 1.0001


def test_uniform_vim_dart_with_vim_weights_equals_fixed_grid_vim(seed):
    """Vim-DART with constant scores + a fixed-grid Vim's weights == that Vim on the stride-2 image."""
    vim = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_classes=5).eval()
    dart = timm.create_model("vim_tiny_dart", img_size=64, patch_size=8, grid_size=4, embed_dim=32, depth=2,
                             num_classes=5, dart_cfg=dict(trunk="tiny_cnn", uniform_scores=True)).eval()
    report = transfer_fixed_grid_weights(dart, vim.state_dict())
    assert report.unexpected == [] and all(k.startswith("patch_embed.scorer.") for k in report.missing)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dart(images), vim(images[:, :, ::2, ::2]), rtol=1e-4, atol=1e-4)


def test_vim_dart_puts_the_class_token_in_the_middle_of_the_dart_sequence(seed):
    model = timm.create_model("vim_tiny_dart", **TINY_DART).eval()
    assert model.cls_index == 6 and model.cls_pos_index == 8
    images = torch.randn(2, 3, 64, 64)
    embedded, dart = model.embed(images)
    expected_cls = model.cls_token[0, 0] + model.pos_embed[0, 8]
    torch.testing.assert_close(embedded[0, 6], expected_cls)
    grid_pe = torch.cat([model.pos_embed[:, :8], model.pos_embed[:, 9:]], 1)
    torch.testing.assert_close(embedded[:, :6], dart.tokens[:, :6] + dart.pos_embed[:, :6])
    torch.testing.assert_close(embedded[:, 7:], dart.tokens[:, 6:] + dart.pos_embed[:, 6:])   # after the class token
    assert embedded.shape[1] == dart.tokens.shape[1] + 1
    from dartmamba.tokenizer import resample_pos_embed
    torch.testing.assert_close(dart.pos_embed, resample_pos_embed(grid_pe, dart.geometry))


def test_vim_dart_training_step_has_no_graph_breaks(seed):
    """Forward + loss trace as one graph (fullgraph), and AOT autograd traces the backward through every op."""
    model = timm.create_model("vim_tiny_dart", **TINY_DART)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y)

    explanation = torch._dynamo.explain(loss_fn)(images, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # compiled vs eager gradients in float64: in float32 the traced graph's different summation order alone moves
    # near-cancelling gradient entries by ~1e-3 relative, which would hide a real difference in the noise
    model.double()
    images = images.double()
    eager_loss = loss_fn(images, labels)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    compiled_loss = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(images, labels)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-10, atol=1e-12)
    for name, grad in eager_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-8, atol=1e-8 * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("num_tokens", [121, 196, 392, 1568])
def test_vim_dart_token_counts(num_tokens):
    with torch.device("meta"):
        model = timm.create_model("vim_small_dart", num_tokens=num_tokens)
    assert model.num_tokens == num_tokens and model.pos_embed.shape == (1, 197, 384)
    assert model.patch_embed.num_rows == round(math.sqrt(num_tokens))
