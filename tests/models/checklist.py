"""timm's model-test checklist as one function, for the image checklist (test_timm_checklist.py) and the clip
checklist (test_videomamba.py)."""
import torch


def check_timm_model(model, inputs, num_classes: int, input_sizes, no_decay) -> None:
    """``model`` (built with ``num_classes`` outputs) on ``inputs`` (a batch of 2): logits, gradients on every
    trainable parameter, forward_features / forward_head, the pretrained cfg (``input_size[1:]`` one of
    ``input_sizes``), reset_classifier, no_weight_decay (at least ``no_decay``), and a full-graph compile that gives
    the same outputs."""
    logits = model(inputs)
    assert logits.shape == (2, num_classes)
    logits.sum().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None for n in trainable), \
        [n for n in trainable if model.get_parameter(n).grad is None]

    model.eval()
    features = model.forward_features(inputs)
    tokens = getattr(model, "num_tokens")
    assert features.shape == (2, tokens + 1, model.num_features)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)

    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    assert cfg["classifier"] + ".weight" in state
    assert cfg["input_size"][1:] in tuple(input_sizes)

    model.reset_classifier(0)
    assert model(inputs).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(inputs).shape == (2, 3)

    assert set(no_decay) <= set(model.no_weight_decay())

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs), model(inputs), rtol=1e-4, atol=1e-4)
