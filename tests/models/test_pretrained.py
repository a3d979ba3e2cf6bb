"""``pretrained=True`` the timm way, resolved by the real huggingface_hub code against a real on-disk Hub cache.

Each check runs in a fresh Python process with ``HF_HOME`` pointing at a temporary cache laid out as the Hub lays it
out (``hub/models--<org>--<name>/refs/main`` + ``snapshots/<commit>/<file>``) and ``HF_HUB_OFFLINE=1``: files the
test writes in the official layouts (hustvl/Vim, DART darvim_* / darvit_*, timm's MobileNetV3) load through
``timm.create_model(tag, pretrained=True)`` and the scorer's pretrained trunk, with nothing on the network.
"""
import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import save_file

import dartmamba  # noqa: F401  (registers the models)
from tests.helpers import REPO
from tests.models.official_layouts import (hustvl_vim_state_dict, official_dart_deit_state_dict,
                                           official_dart_vim_state_dict)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(home, repo_id: str, files: dict) -> None:
    """Lay ``files`` ({filename: writer(path)}) out as huggingface_hub's cache of ``repo_id`` at revision main."""
    org, name = repo_id.split("/")
    root = home / "hub" / f"models--{org}--{name}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for filename, write in files.items():
        write(str(snapshot / filename))


def training_checkpoint(state: dict):
    """An official training checkpoint: the weights under "model", beside the run's argparse arguments."""
    return lambda path: torch.save({"model": state, "args": argparse.Namespace(lr=5e-4, model="x"), "epoch": 299},
                                   path)


def run_in_cache(home, script: str, offline: bool = True) -> dict:
    """Run ``script`` (which prints one JSON line last) with HF_HOME=home; returns that JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("DARTMAMBA_TRUNK_WEIGHTS", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(home), PYTHONPATH=str(REPO))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"       # nothing listens there: the Hub is unreachable
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_release_names_a_file_on_its_hub_repo():
    releases = {name: timm.models.get_pretrained_cfg(name) for name in timm.list_pretrained()
                if timm.models.model_entrypoint(name.split(".")[0]).__module__.startswith("dartmamba.")}
    # hustvl/Vim; darvim-*; darvit-* (the RMT one: no backbone); VideoMamba's Kinetics-400 (t, s, m)
    assert len(releases) == 3 + 4 + 7 + 3
    for name, cfg in releases.items():
        assert cfg.hf_hub_id in ("yinkx3/DART", "hustvl/Vim-tiny-midclstok", "hustvl/Vim-small-midclstok",
                                 "hustvl/Vim-base-midclstok", "OpenGVLab/VideoMamba"), name
        assert cfg.hf_hub_filename and cfg.hf_hub_filename.endswith(".pth"), name
    files = {cfg.hf_hub_filename for cfg in releases.values()}
    assert {"darvim-tiny.pth", "darvim-sm-ft2seq.pth", "darvit-tiny-v2.pth", "darvit-sm-ft392p.pth",
            "vim_s_midclstok_80p5acc.pth"} <= files


def test_release_tags_build_the_architecture_they_were_trained_with():
    with torch.device("meta"):
        dart392 = timm.create_model("vim_small_dart.dart_in1k_392")
        own = timm.create_model("vim_small_dart")
        v2 = timm.create_model("deit_tiny_dart.dart_v2_in1k")
        ft121 = timm.create_model("deit_tiny_dart.dart_in1k_121", num_tokens=100)   # the user's argument wins
    assert dart392.num_tokens == 392 and dart392.patch_embed.scorer.score_norm == "batch"
    assert dart392.patch_embed.scorer.input_size is None                           # the 448 image, as released
    assert own.num_tokens == 196 and own.patch_embed.scorer.score_norm == "sample"
    assert own.patch_embed.scorer.input_size == (224, 224)
    assert (v2.patch_embed.scorer.head_version, v2.patch_embed.scorer.trunk_name) == ("v2", "mobilenetv3_small")
    assert ft121.num_tokens == 100


def test_pretrained_dart_and_hustvl_tags_load_from_the_hub_cache(tmp_path, seed):
    # ImageNet's 1000 classes, as released (timm keeps a checkpoint's classifier only when the class counts match)
    vim_state, _ = official_dart_vim_state_dict(dim=32, depth=2, num_classes=1000)
    deit_state, _ = official_dart_deit_state_dict(dim=32, depth=2, heads=2, num_classes=1000)
    hustvl = hustvl_vim_state_dict(dim=32, depth=2, num_classes=1000)
    hub_cache(tmp_path, "yinkx3/DART", {"darvim-tiny-ft2seq.pth": training_checkpoint(vim_state),
                                        "darvit-sm.pth": training_checkpoint(deit_state)})
    hub_cache(tmp_path, "hustvl/Vim-tiny-midclstok", {"vim_t_midclstok_76p1acc.pth": training_checkpoint(hustvl)})
    result = run_in_cache(tmp_path, """
        import json, timm, torch, dartmamba
        from dartmamba.hub import hub_file
        out = {}
        for tag, filename, repo, kwargs in [
                ("vim_tiny_dart.dart_in1k_392", "darvim-tiny-ft2seq.pth", "yinkx3/DART", dict(embed_dim=32, depth=2)),
                ("deit_small_dart.dart_in1k", "darvit-sm.pth", "yinkx3/DART", dict(embed_dim=32, depth=2, num_heads=2)),
                ("vim_tiny_patch16_224.hustvl_in1k", "vim_t_midclstok_76p1acc.pth", "hustvl/Vim-tiny-midclstok",
                 dict(embed_dim=32, depth=2))]:
            torch.manual_seed(0)
            model = timm.create_model(tag, pretrained=True, **kwargs).eval()
            reference = timm.create_model(tag, **kwargs, **(
                dict(dart_cfg=dict(trunk_weights="random")) if "dart" in tag else {})).eval()
            report = dartmamba.load_official_checkpoint(reference, hub_file(repo, filename))
            size = model.pretrained_cfg["input_size"][-1]
            images = torch.randn(2, 3, size, size)
            with torch.no_grad():
                same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                              reference.state_dict().values()))
                logits = (model(images) - reference(images)).abs().max().item()
            scorer = getattr(model.patch_embed, "scorer", None)
            out[tag] = dict(same=same, logits=logits, missing=len(report.missing), tokens=model.num_tokens,
                            norm=scorer.score_norm if scorer else None,
                            input=scorer.input_size if scorer else None,
                            eps=[m.eps for m in scorer.trunk.modules()
                                 if isinstance(m, torch.nn.BatchNorm2d)][0] if scorer else None)
        print(json.dumps(out))
    """)
    vim, deit, fixed = (result[k] for k in ("vim_tiny_dart.dart_in1k_392", "deit_small_dart.dart_in1k",
                                            "vim_tiny_patch16_224.hustvl_in1k"))
    for name, row in result.items():
        assert row["same"] and row["logits"] == 0.0 and row["missing"] == 0, (name, row)
    assert vim["tokens"] == 392 and deit["tokens"] == 196 and fixed["tokens"] == 196
    for row in (vim, deit):
        assert row["norm"] == "batch" and row["input"] is None and row["eps"] == 1e-3


def test_dart_models_get_timms_pretrained_trunk_from_the_cache(tmp_path, seed):
    reference = timm.create_model("mobilenetv3_small_100")
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
    hub_cache(tmp_path, "timm/mobilenetv3_small_100.lamb_in1k", {"model.safetensors": lambda path: save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, path)})
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "reference.safetensors"))
    result = run_in_cache(tmp_path, f"""
        import json, timm, torch, dartmamba
        from safetensors.torch import load_file
        want = load_file({str(tmp_path / "reference.safetensors")!r})
        model = timm.create_model("vim_tiny_dart", embed_dim=32, depth=2)          # pretrained=False: trunk still
        trunk = model.patch_embed.scorer.trunk.state_dict()
        print(json.dumps(dict(same=all(torch.equal(v, want[k]) for k, v in trunk.items()), count=len(trunk))))
    """)
    assert result["same"] and result["count"] > 100


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_missing_trunk_offline_is_a_fast_error_saying_what_to_get(tmp_path, offline):
    result = run_in_cache(tmp_path, """
        import json, time, timm, dartmamba
        from dartmamba.hub import HubFileUnavailable
        out = {}
        for key, kwargs in (("trunk", {}), ("release", dict(pretrained=True))):
            start = time.perf_counter()
            try:
                timm.create_model("vim_small_dart", **kwargs)
                out[key] = None
            except HubFileUnavailable as exc:
                out[key] = str(exc)
            out[key + "_seconds"] = time.perf_counter() - start
        print(json.dumps(out))
    """, offline=offline)
    release = result["release"]
    assert release is not None and result["release_seconds"] < 15, result
    assert "pretrained weights of vim_small_dart.dart_in1k: yinkx3/DART/darvim-sm.pth" in release
    assert "pretrained_cfg_overlay=dict(file=" in release
    message = result["trunk"]
    assert message is not None
    assert "timm/mobilenetv3_large_100.ra_in1k/model.safetensors" in message and "hf download" in message
    assert "trunk_weights" in message and str(tmp_path / "hub") in message
    assert result["trunk_seconds"] < 15, result            # never minutes of retries


def test_opting_out_and_the_meta_device_fetch_nothing(tmp_path):
    result = run_in_cache(tmp_path, """
        import json, timm, torch, dartmamba
        random = timm.create_model("vim_small_dart", dart_cfg=dict(trunk_weights="random"))
        meta = timm.create_model("vim_small_dart", device="meta")
        print(json.dumps(dict(random=sum(p.numel() for p in random.parameters()),
                              meta=all(p.is_meta for p in meta.parameters()))))
    """)
    assert result["random"] > 25e6 and result["meta"]
