"""A saved model computes what it computed before saving, through every sharing path (issue 27, items 3-4).

Each case is a small model of one family (vim, vim-dart, deit-dart, videomamba, videomamba-dart), trained from
scratch (random init) or loaded from a release (a file in the release's official layout, loaded the way users load
it), with default or non-default ``num_tokens``, ``score_norm``, scorer input size, scorer trunk / head and classifier.
It is saved once by each path and loaded back:

- ``timm.models.save_for_hf`` (plain timm) into the folder layout of a Hugging Face cache (what ``push_to_hf_hub``
  uploads, without the network) -> ``timm.create_model("local-dir:...")`` here, and ``"hf-hub:..."`` in a process
  with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` on that cache: bit-identical logits;
- ``dartmamba.hub.save_pretrained`` -> timm's ``local-dir:`` (bit-identical) and transformers'
  ``TimmWrapperForImageClassification`` / ``pipeline("image-classification")``: bit-identical once the loaded
  weights sit in memory of their own; as loaded, to a tolerance (see the transformers test);
- ``dartmamba.save_model`` -> ``dartmamba.load_model``: bit-identical.

``test_every_cell_of_the_matrix`` prints the largest difference of every cell (``-s``).
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dartmamba
from dartmamba.compat.timm import RECORDS_MODEL_ARGS
from dartmamba.hub import save_pretrained
from dartmamba.models._common import release_kwargs
from tests.helpers import REPO
from tests.models.official_layouts import official_dart_deit_state_dict, official_dart_vim_state_dict
from tests.models.test_videomamba import authors_dart_video_state, videomamba_official_state

pytestmark = pytest.mark.skipif(not RECORDS_MODEL_ARGS, reason=f"timm {timm.__version__} < 1.0.31 saves no "
                                "model_args of its own: the exact Hub round trip needs timm >= 1.0.31")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OWNER = "dartmamba-tests"
DART = dict(img_size=64, patch_size=8, grid_size=4, embed_dim=32, depth=2)
VIDEO = dict(img_size=32, patch_size=8, num_frames=3, embed_dim=32, depth=2)


def _official(tmp, name, state):
    path = tmp / f"{name}.pth"
    torch.save({"model": state, "epoch": 299}, path)
    return dict(file=str(path))


def _scratch(name, **kwargs):
    return lambda tmp: timm.create_model(name, **kwargs)


def _resized(name, size, **kwargs):
    def build(tmp):
        model = timm.create_model(name, **kwargs)
        model.set_input_size(img_size=size)           # the score grid and a half-size scorer input follow
        return model
    return build


def _vim_release_new_head(tmp):
    state, _ = official_dart_vim_state_dict(dim=32, depth=2, num_classes=1000)
    model = timm.create_model("vim_tiny_dart.dart_in1k", pretrained=True, img_size=128, embed_dim=32, depth=2,
                              num_tokens=12, pretrained_cfg_overlay=_official(tmp, "darvim-tiny", state))
    model.reset_classifier(6)                       # fine-tuning a release on another label set
    return model


def _deit_release(tmp):
    state, _ = official_dart_deit_state_dict(dim=32, depth=2, heads=2, num_classes=1000)
    return timm.create_model("deit_small_dart.dart_in1k", pretrained=True, img_size=128, embed_dim=32, depth=2,
                             num_heads=2, pretrained_cfg_overlay=_official(tmp, "darvit-sm", state))


def _videomamba_release(tmp):
    state = videomamba_official_state(32, 2, 3, 4, 8, 400)
    return timm.create_model("videomamba_tiny.k400_f8", pretrained=True, **VIDEO,
                             pretrained_cfg_overlay=_official(tmp, "videomamba_t16_k400_f8_res224", state))


def _videomamba_dart_release(tmp):
    model = timm.create_model("videomamba_tiny_dart", img_size=64, patch_size=16, num_frames=2, embed_dim=32, depth=2,
                              num_classes=5, tokenizer_cfg={"score_mode": "authors"})
    path = tmp / "dvideomamba.pth"
    torch.save({"model": authors_dart_video_state(32, 2, 2, 16, 5)}, path)
    dartmamba.load_official_checkpoint(model, str(path))
    return model


# case -> (family, builder(tmp) -> model). Tiny-CNN scorers unless a MobileNetV3 trunk is the point (its BatchNorm
# eps; random trunk weights: the tests' DARTMAMBA_TRUNK_WEIGHTS).
CASES = {
    "vim": ("vim", _scratch("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2)),
    "vim-head7-avg": ("vim", _scratch("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                                      num_classes=7, global_pool="avg")),
    "vim-dart": ("vim-dart", _scratch("vim_tiny_dart", **DART, tokenizer_cfg=dict(trunk="tiny_cnn"))),
    "vim-dart-options": ("vim-dart", _scratch("vim_tiny_dart", **DART, num_tokens=12, num_classes=5,
                                              dart_cfg=dict(trunk="tiny_cnn", head="v1", score_norm="batch",
                                                            scorer_input_size=32))),
    "vim-dart-release-tokens12-head6": ("vim-dart", _vim_release_new_head),
    "vim-dart-resized": ("vim-dart", _resized("vim_tiny_dart", 128, **DART, num_tokens=12,
                                              tokenizer_cfg=dict(trunk="tiny_cnn", scorer_input_size=32))),
    "deit-dart": ("deit-dart", _scratch("deit_tiny_dart", **DART, num_heads=2, tokenizer_cfg=dict(trunk="tiny_cnn"))),
    "deit-dart-options": ("deit-dart", _scratch("deit_tiny_dart", **DART, num_heads=2, num_tokens=9, num_classes=3,
                                                tokenizer_cfg=dict(trunk="mobilenetv3_small", head="v2",
                                                                   score_norm="batch", scorer_input_size=None,
                                                                   trunk_bn_eps=1e-3))),
    "deit-dart-release": ("deit-dart", _deit_release),
    "deit-dart-resized": ("deit-dart", _resized("deit_tiny_dart", 96, **DART, num_heads=2,
                                                tokenizer_cfg=dict(trunk="tiny_cnn", scorer_input_size=32))),
    "videomamba": ("videomamba", _scratch("videomamba_tiny", **VIDEO)),
    "videomamba-release": ("videomamba", _videomamba_release),
    "videomamba-dart": ("videomamba-dart", _scratch("videomamba_tiny_dart", **VIDEO,
                                                    tokenizer_cfg=dict(trunk="tiny_cnn"))),
    "videomamba-dart-options": ("videomamba-dart", _scratch("videomamba_tiny_dart", **VIDEO, num_tokens=24,
                                                            num_classes=4, tokenizer_cfg=dict(
                                                                trunk="tiny_cnn", score_norm="batch",
                                                                scorer_input_size=16, first_frame_score=0.25))),
    "videomamba-dart-release": ("videomamba-dart", _videomamba_dart_release),
}
IMAGE_CASES = [case for case, (family, _) in CASES.items() if not family.startswith("videomamba")]
# The Hub and transformers paths run in a process of their own each (CI time): per family the case that fails
# without the fix (a default tag in the saved config, a release's adopted settings) and one more.
HUB_CASES = ["vim-head7-avg", "vim-dart", "vim-dart-release-tokens12-head6", "deit-dart", "deit-dart-release",
             "videomamba-release", "videomamba-dart-release"]
TRANSFORMERS_CASES = ["vim", "vim-dart-options", "vim-dart-release-tokens12-head6", "deit-dart", "deit-dart-release",
                      "videomamba-release", "videomamba-dart-options"]


def inputs_for(model) -> torch.Tensor:
    """A batch of 3 of what the model takes (images or clips), at its size."""
    size = model.patch_embed.img_size
    frames = getattr(model, "num_frames", None)
    shape = (3, 3, frames, *size) if frames else (3, 3, *size)
    return torch.randn(shape)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case built once and saved by every path; its inputs and logits (and, for image cases, a PIL image and
    the logits of timm's own eval transform + model on it) in ``reference.pt``."""
    root = tmp_path_factory.mktemp("hub_roundtrip")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    reference = {}
    for case, (_, build) in CASES.items():
        model = build(root).eval()
        x = inputs_for(model)
        repo = root / "hub" / f"models--{OWNER}--{case}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        timm.models.save_for_hf(model, snapshot)            # what push_to_hf_hub uploads, in the cache's layout
        save_pretrained(model, root / "helper" / case)
        dartmamba.save_model(model, str(root / f"{case}.safetensors"))
        with torch.no_grad():
            entry = dict(x=x, logits=model(x))
            if case in IMAGE_CASES:
                image = Image.fromarray(rng.integers(0, 256, (90, 75, 3), dtype=np.uint8))
                image.save(root / f"{case}.png")
                transform = timm.data.create_transform(**timm.data.resolve_input_data_config(model))
                entry["image_logits"] = model(transform(image)[None])[0]
        reference[case] = entry
    torch.save(reference, root / "reference.pt")
    return root, reference


def run_script(script: str, env: dict, cwd) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_local_dir_and_save_model_round_trips_are_bit_exact(saved, case):
    root, reference = saved
    x, want = reference[case]["x"], reference[case]["logits"]
    plain = timm.create_model(f"local-dir:{root / 'hub' / f'models--{OWNER}--{case}' / 'snapshots' / COMMIT}",
                              pretrained=True).eval()
    helper = timm.create_model(f"local-dir:{root / 'helper' / case}", pretrained=True).eval()
    ours = dartmamba.load_model(str(root / f"{case}.safetensors")).eval()
    with torch.no_grad():
        got = {"local-dir (save_for_hf)": plain(x), "local-dir (save_pretrained)": helper(x),
               "save_model/load_model": ours(x)}
    for path, logits in got.items():
        assert logits.shape == want.shape and torch.equal(logits, want), (case, path, max_diff(logits, want))
    for loaded in (plain, helper):               # and it saves again as what it is
        assert timm.models.get_model_args(loaded) == timm.models.get_model_args(ours), case


def test_hf_hub_cache_round_trip_is_bit_exact(saved):
    """``hf-hub:<owner>/<case>`` with ``pretrained=True``, from the cache the push layout filled, offline."""
    root, reference = saved
    env = {k: v for k, v in os.environ.items() if k != "HF_HOME"}
    env.update(HF_HUB_CACHE=str(root / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = run_script(f"""
        import json, timm, torch, dartmamba
        reference = torch.load({str(root / "reference.pt")!r})
        out = {{}}
        for case in {HUB_CASES!r}:
            entry = reference[case]
            model = timm.create_model("hf-hub:{OWNER}/" + case, pretrained=True).eval()
            with torch.no_grad():
                logits = model(entry["x"])
            out[case] = dict(equal=torch.equal(logits, entry["logits"]),
                             diff=(logits.double() - entry["logits"].double()).abs().max().item(),
                             source=model.pretrained_cfg.get("source"))
        print(json.dumps(out))
    """, env, REPO)
    assert set(result) == set(HUB_CASES)
    for case, row in result.items():
        assert row["equal"] and row["source"] == "hf-hub", (case, row)
    saved[1]["_hf_hub"] = result


def test_transformers_loads_what_save_pretrained_wrote(saved):
    """``TimmWrapperForImageClassification.from_pretrained(folder)`` on the inputs, and
    ``pipeline("image-classification", model=folder)`` on a PIL image against timm's own eval transform + model.

    Bit-exact: the pipeline's pixels equal timm's transform's, and the loaded model, once its weights sit in memory
    of their own (``copy.deepcopy``), gives the model's logits. As loaded, transformers keeps the weights as views
    into the safetensors file (4-byte-aligned offsets), where the CPU GEMM takes another path than on the aligned
    tensors of a model timm builds: float32 rounding, amplified by the network (most by the official layouts'
    unit-variance random weights), so those are compared to a tolerance and reported. Runs outside the checkout
    root, where the repository's ``kernels/`` folder would shadow the ``kernels`` package transformers imports."""
    pytest.importorskip("transformers")
    root, reference = saved
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1")
    result = run_script(f"""
        import copy, json, sys
        sys.path.append({str(REPO)!r})          # after site-packages: dartmamba when it is not installed
        import timm, torch, dartmamba
        from PIL import Image
        from transformers import TimmWrapperForImageClassification, pipeline

        def diff(a, b):
            return (a.double() - b.double()).abs().max().item()

        reference = torch.load({str(root / "reference.pt")!r})
        out = {{}}
        for case in {TRANSFORMERS_CASES!r}:
            entry = reference[case]
            folder = {str(root / "helper")!r} + "/" + case
            loaded = TimmWrapperForImageClassification.from_pretrained(folder).eval()
            own = copy.deepcopy(loaded)
            with torch.no_grad():
                row = dict(exact=torch.equal(own(entry["x"]).logits, entry["logits"]),
                           loaded=diff(loaded(entry["x"]).logits, entry["logits"]),
                           scale=entry["logits"].abs().max().item())
            if "image_logits" in entry:
                classify = pipeline("image-classification", model=folder, function_to_apply="none")
                want = entry["image_logits"]
                image = Image.open({str(root)!r} + f"/{{case}}.png")
                pixels = classify.image_processor(image, return_tensors="pt")["pixel_values"]
                timm_model = timm.create_model("local-dir:" + folder, pretrained=True)
                transform = timm.data.create_transform(**timm.data.resolve_input_data_config(timm_model))
                found = classify(image, top_k=len(want))
                # every class's score, best first (ImageNet's label names repeat: values, and the best label)
                got = torch.tensor([r["score"] for r in found], dtype=torch.float64)
                with torch.no_grad():
                    row.update(pixels=torch.equal(pixels, transform(image)[None]),
                               pipeline_exact=torch.equal(own(pixels).logits[0], want),
                               pipeline=diff(got, want.sort(descending=True).values),
                               top1=found[0]["label"] == classify.model.config.id2label[int(want.argmax())])
            out[case] = row
        print(json.dumps(out))
    """, env, root)
    assert set(result) == set(TRANSFORMERS_CASES)
    for case, row in result.items():
        assert row["exact"], (case, row)
        tolerance = 5e-3 * max(1.0, row["scale"])            # amplified float32 rounding (docstring)
        assert row["loaded"] <= tolerance, (case, row)
        if case in IMAGE_CASES:
            assert row["pixels"] and row["pipeline_exact"] and row["top1"], (case, row)
            assert row["pipeline"] <= tolerance, (case, row)
    saved[1]["_transformers"] = result


def test_every_cell_of_the_matrix(saved, capsys):
    """The largest |delta logits| per family and path (after the two tests above; printed with -s)."""
    root, reference = saved
    if "_hf_hub" not in reference or "_transformers" not in reference:
        pytest.skip("needs test_hf_hub_cache_round_trip_is_bit_exact and test_transformers_... in the same run")
    table = {}
    for case, (family, _) in CASES.items():
        cell = table.setdefault(family, {"hf-hub": 0.0, "transformers": 0.0, "pipeline": 0.0})
        hub, wrapper = reference["_hf_hub"].get(case, {}), reference["_transformers"].get(case, {})
        cell["hf-hub"] = max(cell["hf-hub"], hub.get("diff", 0.0))
        cell["transformers"] = max(cell["transformers"], wrapper.get("loaded", 0.0))
        cell["pipeline"] = max(cell["pipeline"], wrapper.get("pipeline", 0.0))
    with capsys.disabled():
        print("\nlargest |delta logits| (local-dir and save_model: 0, asserted bit-exact):")
        for family, cell in table.items():
            print(f"  {family:16s} " + "  ".join(f"{k} {v:.3g}" for k, v in cell.items()))
    assert all(cell["hf-hub"] == 0.0 for cell in table.values())


# ---------------------------------------------------------------------------------------------------------------
# The rules underneath
# ---------------------------------------------------------------------------------------------------------------
def test_a_release_applies_only_with_its_own_file():
    releases = {"vim_tiny_dart.dart_in1k_392": dict(num_tokens=392)}
    own = timm.models.get_pretrained_cfg("vim_tiny_dart.dart_in1k_392")
    saved_cfg = {**own.to_dict(), "file": "/some/folder", "source": "local-dir", "hf_hub_id": None}
    hub_cfg = {**own.to_dict(), "hf_hub_id": "someone/vim_tiny_dart", "hf_hub_filename": None, "source": "hf-hub"}
    applied = dict(num_tokens=392)
    assert release_kwargs("vim_tiny_dart", False, dict(pretrained_cfg="dart_in1k_392"), releases) == {
        "pretrained_cfg": "dart_in1k_392", **applied}                              # the tag named: its model
    assert release_kwargs("vim_tiny_dart", True, dict(pretrained_cfg=own), releases)["num_tokens"] == 392
    for cfg in (saved_cfg, hub_cfg):                                               # a saved model's config
        assert "num_tokens" not in release_kwargs("vim_tiny_dart", True, dict(pretrained_cfg=cfg), releases)
    with torch.device("meta"):
        model = timm.create_model("vim_tiny_dart", pretrained_cfg=saved_cfg)
    assert model.num_tokens == 196 and model.patch_embed.scorer.score_norm == "sample"


def test_model_args_record_what_the_model_computes_with():
    with torch.device("meta"):
        model = timm.create_model("vim_tiny_dart.dart_in1k_392", dart_cfg=dict(trunk_weights="random"))
    args = timm.models.get_model_args(model)
    assert args["num_tokens"] == 392 and "dart_cfg" not in args
    cfg = args["tokenizer_cfg"]
    assert (cfg["score_norm"], cfg["scorer_input_size"], cfg["trunk"], cfg["head"]) == (
        "batch", None, "mobilenetv3_small", "v2")
    assert cfg["trunk_bn_eps"] == 1e-5 and cfg["trunk_weights"] == "random"
    model.patch_embed.scorer.trunk.set_bn_eps(1e-3)          # what loading the release's torchvision trunk does
    model.reset_classifier(10)
    args = timm.models.get_model_args(model)
    assert args["tokenizer_cfg"]["trunk_bn_eps"] == 1e-3 and args["num_classes"] == 10
    json.dumps(args)                                          # save_for_hf writes it as JSON


def test_trunk_bn_eps_is_a_checked_tokenizer_option():
    with torch.device("meta"):
        model = timm.create_model("vim_tiny_dart", tokenizer_cfg=dict(trunk_bn_eps=1e-3))
    eps = {m.eps for m in model.patch_embed.scorer.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {1e-3}
    with pytest.raises(ValueError, match=r"trunk_bn_eps: the 'tiny_cnn' trunk has no BatchNorm"):
        timm.create_model("vim_tiny_dart", **DART, tokenizer_cfg=dict(trunk="tiny_cnn", trunk_bn_eps=1e-3))
    with pytest.raises(ValueError, match=r"trunk_bn_eps must be None or a number > 0, got -1"):
        timm.create_model("vim_tiny_dart", device="meta", tokenizer_cfg=dict(trunk_bn_eps=-1))


def test_save_pretrained_refuses_what_it_cannot_save(tmp_path):
    from dartmamba.models import VisionMamba

    with pytest.raises(ValueError, match=r"model: save_pretrained needs a model made by timm.create_model"):
        save_pretrained(VisionMamba(img_size=32, patch_size=8, embed_dim=32, depth=1), tmp_path)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1)
    with pytest.raises(TypeError, match=r"folder must be a path \(str or os.PathLike\), got int"):
        save_pretrained(model, 3)
    config = json.loads((tmp_path / "config.json").read_text()) if (tmp_path / "config.json").exists() else None
    assert config is None                                     # nothing written by the refused calls
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "num_classes" not in config["model_args"] and config["num_classes"] == 1000
    assert (tmp_path / "model.safetensors").exists()
