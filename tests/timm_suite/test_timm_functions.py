"""timm's own test functions (from its sdist's tests/test_models.py) on the dartmamba models its parametrisation
leaves out: timm selects its config, intermediates and pruning tests by model-name pattern (NON_STD_FILTERS) and by
defining module (FEAT_INTER_FILTERS), which do not name ours. Run by scripts/test_timm_suite.sh with
DARTMAMBA_TIMM_TESTS pointing at the sdist's tests folder and the dartmamba_timm_plugin loaded (it registers the
test-size DART models test_vim_dart / test_deit_dart)."""
import importlib.util
import os
import sys

import pytest

import dartmamba_timm_plugin as plugin


def _timm_test_module():
    path = os.path.join(os.environ["DARTMAMBA_TIMM_TESTS"], "test_models.py")
    spec = importlib.util.spec_from_file_location("timm_test_models", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


timm_tests = _timm_test_module()
OURS = sorted(plugin.OURS)


def _not_listed_by_timm(selection: list[str]) -> list[str]:
    listed = {name.split(".")[0] for name in selection}         # timm lists some with their pretrained tags
    return [name for name in OURS if name not in listed]


NON_STD = timm_tests.list_models(filter=timm_tests.NON_STD_FILTERS, include_tags=True)
FEAT_INTER = timm_tests.list_models(module=timm_tests.FEAT_INTER_FILTERS)


@pytest.mark.parametrize("model_name", _not_listed_by_timm(NON_STD))
def test_model_default_cfgs_non_std(model_name, cfg_device):
    """Vim and the test-size models are token models, like timm's ViTs: forward_features gives (B, 1 + N, D)."""
    timm_tests.test_model_default_cfgs_non_std(model_name, 1, cfg_device)


@pytest.mark.parametrize("model_name", _not_listed_by_timm(FEAT_INTER))
def test_model_forward_intermediates(model_name):
    timm_tests.test_model_forward_intermediates(model_name, 1)


@pytest.mark.parametrize("model_name", _not_listed_by_timm(FEAT_INTER))
def test_model_forward_intermediates_features(model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, 1)


@pytest.mark.parametrize("model_name", _not_listed_by_timm(FEAT_INTER))
def test_prune_intermediate_layers_contract(model_name):
    timm_tests.test_prune_intermediate_layers_contract(model_name)


@pytest.fixture
def cfg_device():
    return "meta" if timm_tests._HAS_DEVICE_CONTEXT else timm_tests.torch_device
