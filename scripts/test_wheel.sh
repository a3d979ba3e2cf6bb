#!/usr/bin/env bash
# A wheel install trains, as a user's would: build the wheel from a clean copy of the checkout, check it holds every
# module, kernel source and recipe, install it into a fresh virtual environment outside the checkout, and from a
# temporary working directory run
#   1. `dartmamba-train --config demo/vim_dart ...`          (a recipe by name, from the installed package)
#   2. `dartmamba-train --config myconfigs/demo/vim_dart.yaml` (a copied recipe tree whose DeepSpeed JSON exists only
#      in the copy: paths in a YAML resolve relative to that YAML)
#   3. `python -m dartmamba_train.demo --out demo ...`       (the demo, outputs under the working directory)
# each a few steps. The fresh venv gets the wheel only; the dependencies (torch and the rest, several GB) are the
# project venv's, reached through a .pth line appended after the venv's own site-packages (so the wheel's dartmamba
# wins and the checkout's editable install is never activated). Usage: bash scripts/test_wheel.sh [python]
# (default: the project's .venv, made by scripts/setup_env.sh). The last line says PASS or FAIL.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:-$repo/.venv/bin/python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/dartmamba-wheel.XXXXXX")"
start=$(date +%s)
trap 'rm -rf "$work"' EXIT
fail() { echo "test_wheel: FAIL: $*"; exit 1; }
step() { echo "test_wheel: [$(( $(date +%s) - start )) s] $*"; }

[ -x "$py" ] || fail "no python at $py (run scripts/setup_env.sh first)"

step "copying the checkout's files (tracked and untracked, not ignored) to $work/src"
"$py" - "$repo" "$work/src" <<'EOF' || fail "could not copy the checkout"
import os, shutil, subprocess, sys
repo, dest = sys.argv[1:]
try:
    listed = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
except (OSError, subprocess.CalledProcessError):   # not a git checkout: everything but environments and outputs
    skip = {".git", ".venv", ".venv-device-stack", "build", "dist", "outputs", "__pycache__"}
    listed = []
    for root, dirs, files in os.walk(repo):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        listed += [os.path.relpath(os.path.join(root, f), repo) for f in files]
for rel in filter(None, listed):
    src = os.path.join(repo, rel)
    if os.path.isfile(src):              # a tracked file deleted in the working tree is not copied
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
EOF

step "building the wheel"
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src" > "$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log"; fail "pip wheel failed"; }
wheel="$(ls "$work"/dist/dartmamba-*.whl)" || fail "no wheel built"

step "checking the wheel's contents against the checkout"
"$py" - "$work/src" "$wheel" <<'EOF' || fail "the wheel lacks files of the checkout (listed above)"
import os, sys, zipfile
src, wheel = sys.argv[1:]
names = set(zipfile.ZipFile(wheel).namelist())
# checkout folder -> installed package, and which files of it must ship
layout = {"dartmamba": ("dartmamba", (".py", ".cpp", ".h", ".cu", ".cuh")), "kernels": ("dartmamba_kernels", (".py",)),
          "train": ("dartmamba_train", (".py",)), "configs": ("dartmamba_configs", (".py", ".yaml", ".json"))}
missing, counted = [], 0
for folder, (package, suffixes) in layout.items():
    for root, dirs, files in os.walk(os.path.join(src, folder)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(suffixes):
                rel = os.path.relpath(os.path.join(root, name), os.path.join(src, folder)).replace(os.sep, "/")
                counted += 1
                if f"{package}/{rel}" not in names:
                    missing.append(f"{folder}/{rel} -> {package}/{rel}")
for line in missing:
    print(f"test_wheel: missing from the wheel: {line}")
if missing or counted == 0:
    sys.exit(1)
print(f"test_wheel: the wheel holds all {counted} modules, kernel sources and recipes of the checkout")
EOF

step "installing the wheel into a fresh venv ($work/venv)"
"$py" -m venv "$work/venv" || fail "python -m venv failed"
venv_py="$work/venv/bin/python"
"$venv_py" -m pip install -q --no-deps "$wheel" > "$work/install.log" 2>&1 \
  || { tail -30 "$work/install.log"; fail "pip install of the wheel failed"; }
deps="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
own="$("$venv_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$deps" > "$own/zz_dartmamba_test_dependencies.pth"

mkdir -p "$work/cwd"
cd "$work/cwd" || fail "no working directory"
unset PYTHONPATH
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
tiny=(train.epochs=1 train.steps_per_epoch=3 data.canvas.val_length=16 train.log_interval=1
      output.progress_bar=false)

step "the installed packages come from the wheel, none from the checkout"
"$venv_py" - "$own" <<'EOF' || fail "an installed package resolves outside the fresh venv"
import importlib, os, sys
own = os.path.realpath(sys.argv[1])
for name in ("dartmamba", "dartmamba_kernels", "dartmamba_train", "dartmamba_configs"):
    where = os.path.realpath(importlib.import_module(name).__file__)
    print(f"test_wheel: {name}: {where}")
    assert where.startswith(own + os.sep), f"{name} imported from {where}, not from {own}"
EOF

step "1/3: dartmamba-train --config demo/vim_dart (a recipe name)"
"$work/venv/bin/dartmamba-train" --config demo/vim_dart "${tiny[@]}" output.dir=runs/by_name > by_name.log 2>&1 \
  || { tail -40 by_name.log; fail "training from the recipe name failed"; }
[ -s runs/by_name/summary.csv ] && [ -s runs/by_name/last.safetensors ] \
  || fail "training from the recipe name wrote no summary.csv / last.safetensors under the working directory"

step "2/3: dartmamba-train --config myconfigs/demo/vim_dart.yaml (a copied recipe tree)"
"$venv_py" - <<'EOF' || fail "could not copy the installed recipes"
import os, shutil
from importlib.resources import files
shutil.copytree(os.fspath(files("dartmamba_configs")), "myconfigs", ignore=shutil.ignore_patterns("__*"))
# the copy's DeepSpeed JSON under a name the installed recipes do not have: found only relative to the copied YAML
os.rename("myconfigs/deepspeed/zero0.json", "myconfigs/deepspeed/zero0_copied.json")
base = "myconfigs/base/demo_canvas.yaml"
text = open(base).read()
assert "../deepspeed/zero0.json" in text, f"{base} no longer names ../deepspeed/zero0.json"
open(base, "w").write(text.replace("../deepspeed/zero0.json", "../deepspeed/zero0_copied.json"))
EOF
"$work/venv/bin/dartmamba-train" --config myconfigs/demo/vim_dart.yaml "${tiny[@]}" output.dir=runs/by_path \
  > by_path.log 2>&1 || { tail -40 by_path.log; fail "training from the copied YAML failed"; }
grep -q "$work/cwd/myconfigs/deepspeed/zero0_copied.json" runs/by_path/config.yaml \
  || fail "runs/by_path/config.yaml does not name the copied DeepSpeed JSON (paths not relative to the YAML?)"

step "3/3: python -m dartmamba_train.demo --out demo (the demo)"
"$venv_py" -m dartmamba_train.demo --out demo "${tiny[@]}" > demo.log 2>&1 \
  || { tail -40 demo.log; fail "the demo failed"; }
[ -s demo/dart_tokens.png ] && [ -s demo/summary.json ] && [ -s demo/vim_fixed/summary.csv ] \
  || fail "the demo wrote no dart_tokens.png / summary.json / vim_fixed/summary.csv under the working directory"

echo "test_wheel: PASS: the wheel trains from a recipe name and a copied YAML and runs the demo" \
     "($(( $(date +%s) - start )) s)"
