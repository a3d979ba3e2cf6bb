"""ONNX export (dartmamba.export): every family exported once (module-scoped, depth 1, tiny widths), run with
onnxruntime's CPU provider on random inputs of batch sizes other than the one exported, and compared with the eager
model; the scan's and searchsorted's translations against their references; the command line's report and its
one-line errors."""
import contextlib
import io
import re

import pytest
import timm
import torch
from torch import nn

pytest.importorskip("onnx", reason="the [export] extra (onnx) is not installed")
pytest.importorskip("onnxscript", reason="the [export] extra (onnxscript) is not installed")
pytest.importorskip("onnxruntime", reason="the [export] extra (onnxruntime) is not installed")

import onnx  # noqa: E402

import dartmamba.models  # noqa: E402,F401  (registers the models)
from dartmamba import save_model  # noqa: E402
from dartmamba.export import (DEFAULT_OPSET, ExportError, check_parity, export_onnx, main,  # noqa: E402
                              session)
from dartmamba.ops import selective_scan  # noqa: E402
from dartmamba.ops.scan import selective_scan_reference  # noqa: E402

TOLERANCE = 1e-4
TINY = dict(depth=1, num_classes=5)
FAMILIES = {   # family: (model, kwargs); the tokenizer's trunk is the tiny CNN, so no Hub download
    "vim": ("vim_tiny_patch16_224", dict(TINY, img_size=32, patch_size=8, embed_dim=32)),
    "vim_dart": ("vim_tiny_dart", dict(TINY, img_size=64, patch_size=8, grid_size=4, num_tokens=12, embed_dim=32,
                                       dart_cfg=dict(trunk="tiny_cnn"))),
    "deit_dart": ("deit_tiny_dart", dict(TINY, img_size=64, patch_size=8, grid_size=4, num_tokens=12,
                                         embed_dim=32, num_heads=2, dart_cfg=dict(trunk="tiny_cnn"))),
    "videomamba": ("videomamba_tiny", dict(TINY, img_size=32, patch_size=8, num_frames=3, embed_dim=32)),
    "videomamba_dart": ("videomamba_tiny_dart", dict(TINY, img_size=32, patch_size=8, num_frames=3, num_tokens=30,
                                                     embed_dim=32, tokenizer_cfg=dict(trunk="tiny_cnn"))),
}
EXPORT_BATCH = 2


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """The Vim family through the command line: a checkpoint written by save_model, exported and checked by
    ``main`` once; (model, onnx path, exit status, printed lines)."""
    folder = tmp_path_factory.mktemp("onnx_cli")
    torch.manual_seed(0)
    name, kwargs = FAMILIES["vim"]
    model = timm.create_model(name, **kwargs).eval()
    checkpoint, out = folder / "vim.safetensors", folder / "vim.onnx"
    save_model(model, str(checkpoint))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main([str(a) for a in ("--checkpoint", checkpoint, "--out", out, "--batch-size", EXPORT_BATCH)])
    return model, out, status, printed.getvalue().strip().splitlines()


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    """(family, model, onnx path, report or None); Vim comes from the command line, DART families with their token
    edges as a second output."""
    family = request.param
    if family == "vim":
        model, out, status, _ = request.getfixturevalue("cli_export")
        assert status == 0
        return family, model, out, None
    torch.manual_seed(1)
    name, kwargs = FAMILIES[family]
    model = timm.create_model(name, **kwargs).eval()
    path = tmp_path_factory.mktemp("onnx") / f"{family}.onnx"
    report = export_onnx(model, path, batch_size=EXPORT_BATCH, token_edges="dart" in family)
    return family, model, path, report


def test_family_matches_eager_at_other_batch_sizes(exported, seed):
    family, model, path, report = exported
    edges = "dart" in family
    # exported with batch 2: the batch axis is dynamic; image-like inputs (the default) and pixel noise
    for batch, kind in ((3, "smooth"), (1, "noise")):
        parity = check_parity(path, model, batch_size=batch, token_edges=edges, seed=seed + batch, kind=kind)
        assert parity.batch_size == batch and parity.inputs == kind
        assert parity.max_rel <= TOLERANCE, parity.summary()
        if edges:                    # DART's token edges (score-grid units) equal eager's to float32 rounding
            assert parity.edges_max_abs <= TOLERANCE and parity.edges_max_rel <= TOLERANCE, parity.summary()
        assert parity.passed
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == DEFAULT_OPSET
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param     # symbolic batch
    ops = {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}
    assert "Scan" in ops if family.startswith(("vim", "videomamba")) else "Scan" not in ops
    # nothing of ours is left as a custom op: every node is a standard op or a function defined in the file
    functions = {(f.domain, f.name) for f in proto.functions}
    custom = [(n.domain, n.op_type) for n in proto.graph.node
              if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in functions]
    assert not custom, custom
    if report is not None:
        assert report.opset == DEFAULT_OPSET and report.dynamic_batch and report.num_nodes > 0
        assert report.outputs == (("logits", "token_edges") if edges else ("logits",))


def test_cli_exports_checks_and_prints_parity(cli_export):
    model, out, status, printed = cli_export
    assert status == 0 and len(printed) == 2, printed
    assert re.fullmatch(rf"exported vim_tiny_patch16_224 to {re.escape(str(out))}: opset {DEFAULT_OPSET}, "
                        r"[0-9.]+ MiB, \d+ nodes, outputs logits, dynamic batch \(traced with input "
                        r"\(2, 3, 32, 32\)\), [0-9.]+ s", printed[0]), printed[0]
    found = re.fullmatch(r"parity \(onnxruntime CPUExecutionProvider vs PyTorch eager, batch 3, smooth inputs\): "
                         r"logits max abs "
                         r"(\S+), max rel (\S+) \(tolerance 0.0001\): ok", printed[1])
    assert found, printed[1]
    assert float(found.group(2)) <= TOLERANCE
    assert out.stat().st_size > 0


def test_cli_names_an_unknown_model_in_one_line(tmp_path, capsys):
    assert main(["--model", "vim_nonexistent", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --model: unknown model 'vim_nonexistent' (see timm.list_models('*dart*'))\n"
    assert main(["--model", "vim_tiny_patch16_224", "--out", str(tmp_path / "x.onnx"), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --batch-size: must be >= 1, got 0\n"


def test_token_edges_of_a_model_without_dart_are_refused_in_one_line(cli_export, tmp_path):
    model = cli_export[0]
    with pytest.raises(ExportError) as info:
        export_onnx(model, tmp_path / "x.onnx", token_edges=True)
    assert str(info.value) == ("token_edges: VisionMamba has no DART tokenizer (patch_embed is GridTokenizer); "
                               "export the logits alone")
    assert not (tmp_path / "x.onnx").exists()


@torch.library.custom_op("dartmamba_test_onnx::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class _Opaque(nn.Module):
    def forward(self, x):
        return _opaque(x) + 1


def test_an_op_without_translation_is_named_in_one_line(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(_Opaque(), tmp_path / "x.onnx", example=torch.randn(2, 3, 4, 4), name="opaque_model")
    message = str(info.value)
    assert message == ("cannot export opaque_model: op dartmamba_test_onnx.opaque.default has no ONNX translation "
                       "(give one in custom_translation_table, or register a 'torch' backend for it)")


class _Scan(nn.Module):
    """The torch scan backend (what export selects) on (u, delta, B, C, z) packed in one input."""

    def __init__(self, dim: int, dstate: int, groups: int):
        super().__init__()
        self.dim, self.dstate, self.groups = dim, dstate, groups
        self.A = nn.Parameter(-torch.rand(dim, dstate) * 3 - 0.1)
        self.D = nn.Parameter(torch.randn(dim))
        self.bias = nn.Parameter(torch.randn(dim) * 0.5)

    def split(self, packed):
        u, delta, z = packed[:, :self.dim], packed[:, self.dim:2 * self.dim], packed[:, 2 * self.dim:3 * self.dim]
        bc = packed[:, 3 * self.dim:].reshape(packed.shape[0], 2, self.groups, self.dstate, packed.shape[-1])
        return u, delta, bc[:, 0], bc[:, 1], z

    def forward(self, packed, backend="torch"):
        u, delta, B, C, z = self.split(packed)
        return selective_scan(u, delta, self.A, B, C, self.D, z=z, delta_bias=self.bias, delta_softplus=True,
                              backend=backend)


def _packed(batch: int, width: int, length: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(batch, width, length) * scale


def test_scan_translation_matches_the_reference(tmp_path, seed):
    """The ONNX Scan translation of the torch scan's custom op (grouped B, C, gate, skip, bias, softplus with
    steps beyond its threshold) against the sequential reference, at batch sizes other than the one exported."""
    dim, dstate, groups, length = 6, 5, 2, 23
    module = _Scan(dim, dstate, groups).eval()
    width = 3 * dim + 2 * groups * dstate
    path = tmp_path / "scan.onnx"
    export_onnx(module, path, example=_packed(2, width, length), name="scan")
    runner = session(path)
    for batch in (1, 3):
        packed = _packed(batch, width, length, scale=3.0)
        packed[:, dim:2 * dim, :3] = 25.0            # softplus(x) = x above 20
        got = torch.from_numpy(runner.run(None, {runner.get_inputs()[0].name: packed.numpy()})[0])
        u, delta, B, C, z = module.split(packed)
        with torch.no_grad():
            want = selective_scan_reference(u, delta, module.A, B, C, module.D, z, module.bias, True)
        # float32 over 23 steps of values up to ~1e3: the error relative to the output's scale, as check_parity
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
        assert got.shape == want.shape


class _SearchSorted(nn.Module):
    def forward(self, packed):
        cdf = torch.cumsum(packed[:, :9].abs(), dim=1)
        levels = packed[:, 9:] * cdf[:, -1:]
        levels = torch.cat([levels, cdf[:, 2:5]], dim=1)           # ties: levels equal to entries
        return torch.searchsorted(cdf, levels), torch.searchsorted(cdf, levels, right=True)


def test_searchsorted_translation_matches_torch(tmp_path, seed):
    module = _SearchSorted()
    path = tmp_path / "searchsorted.onnx"
    export_onnx(module, path, example=torch.rand(2, 16), name="searchsorted")
    runner = session(path)
    packed = torch.rand(4, 16)
    got = runner.run(None, {runner.get_inputs()[0].name: packed.numpy()})
    for mine, want in zip(got, module(packed)):
        assert torch.equal(torch.from_numpy(mine), want)


class _Standardise(nn.Module):
    """The DART scorer's score standardisation: a small epsilon next to a small std."""

    def forward(self, raw):
        mean, std = raw.mean(dim=(1, 2), keepdim=True), raw.std(dim=(1, 2), keepdim=True)
        return (raw - mean) / (std + 1e-8)


def test_small_constants_survive_the_export(tmp_path, seed):
    """onnxscript's rewrite rules would delete ``std + 1e-8`` as ``x + 0``; the export must keep it."""
    path = tmp_path / "standardise.onnx"
    export_onnx(_Standardise(), path, example=torch.rand(2, 14, 14) * 1e-4, name="standardise")
    raw = (torch.rand(3, 14, 14) + 0.5) * 1e-4                  # std ~3e-5: the epsilon matters at 3e-4
    runner = session(path)
    got = torch.from_numpy(runner.run(None, {runner.get_inputs()[0].name: raw.numpy()})[0])
    want = _Standardise()(raw)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
