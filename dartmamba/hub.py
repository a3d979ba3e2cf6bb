"""Files from the Hugging Face Hub, resolved the way timm resolves them, but without minutes of retries offline.

:func:`hub_file` returns the local path of ``repo_id/filename``: from the Hub cache when it is there (no network at
all), else downloaded with ``huggingface_hub.hf_hub_download``. When the file is not cached and the Hub cannot be
reached (``HF_HUB_OFFLINE=1``, or a connection probe that fails within a few seconds), it raises
:class:`HubFileUnavailable` at once, saying which file to get and where to put it.

:func:`save_pretrained` writes a model folder that timm (``local-dir:``, ``hf-hub:`` once uploaded) and transformers
(``TimmWrapperForImageClassification``, ``pipeline("image-classification")``) both load.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

__all__ = ["HubFileUnavailable", "hub_file", "hub_cache_dir", "hub_offline", "save_pretrained"]

_PROBE_TIMEOUT_S = 3.0


class HubFileUnavailable(RuntimeError):
    """A Hub file is neither in the local cache nor downloadable now."""


def hub_cache_dir(cache_dir=None) -> str:
    """The Hub cache folder files are looked up in (``HF_HUB_CACHE`` / ``HF_HOME/hub`` unless given)."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if "HF_HOME" in os.environ
                                              else constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether the Hub is switched off (``HF_HUB_OFFLINE=1``, read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _unreachable(endpoint: str) -> str | None:
    """None when a TCP connection to the Hub opens within a few seconds, else why not."""
    parsed = urlparse(endpoint)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{host}:{port} is unreachable ({type(exc).__name__}: {exc})"


def hub_file(repo_id: str, filename: str, *, revision: str | None = None, cache_dir=None, what: str = "file",
             instead: str | None = None) -> str:
    """Local path of ``repo_id/filename`` (cache first, then a download).

    Args:
        repo_id, filename, revision: the Hub file (``revision`` default: the ``main`` branch).
        cache_dir: Hub cache folder (default: huggingface_hub's, i.e. ``HF_HUB_CACHE`` or ``HF_HOME/hub``).
        what: what the file is, for the error message (e.g. "the MobileNetV3 scorer trunk").
        instead: how to do without the download, for the error message (e.g. "pass trunk_weights=<file>").

    Raises:
        HubFileUnavailable: not cached and the Hub cannot be reached; the message names the file, the cache and the
            command that fetches it.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache = hub_cache_dir(cache_dir)
    cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
    if isinstance(cached, str) and os.path.isfile(cached):
        return cached
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else _unreachable(_endpoint())
    if reason is not None:
        alternative = f"; or {instead}" if instead else ""
        raise HubFileUnavailable(
            f"{what}: {repo_id}/{filename} is not in the Hugging Face cache ({cache}) and cannot be downloaded now "
            f"({reason}). On a machine with internet run `hf download {repo_id} {filename}` (huggingface_hub's CLI; "
            f"older releases: `huggingface-cli download ...`) and copy its cache folder here (or point HF_HOME at "
            f"it){alternative}.")
    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache)


def save_pretrained(model, folder, *, safe_serialization=True, model_config: dict | None = None,
                    data_config: dict | None = None) -> str:
    """Save ``model`` (made by ``timm.create_model``) into ``folder`` so that timm and transformers both load it.

    timm's ``save_for_hf`` writes the weights and config.json; its ``model_args`` record what the model computes
    with (our models complete timm's record: :func:`dartmamba.models._common.effective_model_args`). One edit
    follows: ``num_classes`` leaves ``model_args`` (it stays at the root of the config, where timm's ``local-dir:`` /
    ``hf-hub:`` loaders read it), because transformers' TimmWrapper passes ``num_classes=num_labels`` itself and
    ``model_args`` after it (timm 1.0.31 + transformers 5.25: "got multiple values for keyword argument
    'num_classes'", for timm's own models as well). Upload the folder as it is (``huggingface_hub.upload_folder``) to
    publish it; ``timm.models.push_to_hf_hub`` writes the unedited config.

    Args:
        model: a timm model (it has ``pretrained_cfg``); the config's preprocessing (``pretrained_cfg``: input size,
            mean, std, crop) is the model's, as timm's ``resolve_data_config(model=model)`` gives it.
        folder: where to write (created).
        safe_serialization, model_config, data_config: as ``timm.models.save_for_hf`` (default: safetensors).

    Returns:
        The folder, as a string.
    """
    import json
    from pathlib import Path

    import timm.models

    from .files import atomic_write_text

    if getattr(model, "pretrained_cfg", None) is None:
        raise ValueError(f"model: save_pretrained needs a model made by timm.create_model (it has pretrained_cfg), "
                         f"got a {type(model).__name__} without one")
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    from .compat.timm import MODEL_ARGS_ATTRIBUTE, RECORDS_MODEL_ARGS

    extra = {} if data_config is None else {"data_config": data_config}
    if not RECORDS_MODEL_ARGS:          # timm < 1.0.31 does not read the model's record itself: hand it over
        extra["model_args"] = dict(getattr(model, MODEL_ARGS_ATTRIBUTE, None) or {})
    timm.models.save_for_hf(model, folder, model_config=model_config, safe_serialization=safe_serialization,
                            **extra)
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    atomic_write_text(path, json.dumps(config, indent=2))
    return os.fspath(folder)
