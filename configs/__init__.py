"""The training recipes, installed as the data package ``dartmamba_configs`` (this folder in a checkout).

Find them with ``importlib.resources.files("dartmamba_configs")``; ``dartmamba-train --config demo/vim_dart`` takes a
recipe by its name (its path below this folder, without ``.yaml``).
"""
