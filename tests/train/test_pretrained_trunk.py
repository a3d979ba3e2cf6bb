"""The paper's recipes use the pretrained scorer trunk: on a fresh machine with nothing cached and no Hub, the first
vim_small_dart training run stops at once with the message saying which file to get, never a random trunk."""
import os
import time

from tests.train.train_helpers import run_train, train_env


def test_recipe_without_the_pretrained_trunk_stops_at_once_saying_how(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        folder = tmp_path / "data" / split / "class_a"
        folder.mkdir(parents=True)
        for name in ("one", "two"):
            Image.new("RGB", (32, 32)).save(folder / f"{name}.png")
    env = train_env()
    env.pop("DARTMAMBA_TRUNK_WEIGHTS", None)          # the recipe's own choice: trunk_weights=pretrained
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    result = run_train(["--config", "configs/vim_small_dart.yaml", f"data.root={tmp_path / 'data'}",
                        f"output.dir={tmp_path / 'run'}", "train.compile=false",
                        "train.batch_size=2", "data.num_workers=0"], check=False, env=env)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dartmamba-train: the frozen scorer trunk (mobilenetv3_large_100"), last
    assert "timm/mobilenetv3_large_100.ra_in1k/model.safetensors" in last and "hf download" in last
    assert "trunk_weights" in last and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    assert seconds < 120, seconds
