"""The cluttered-canvas data set (dartmamba.data): determinism, geometry of the object, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dartmamba.data import ClutteredCanvas, digits_source


@pytest.fixture(scope="module")
def digits():
    return digits_source("train")


def make(digits, **kwargs):
    return ClutteredCanvas(*digits, **{"canvas_size": 48, "object_size": (10, 16), **kwargs})


def test_digits_split_is_stratified_disjoint_and_fixed():
    train_x, train_y = digits_source("train")
    val_x, val_y = digits_source("val")
    all_x, all_y = digits_source("all")
    assert train_x.shape[1:] == (8, 8) and train_x.dtype == np.float32
    assert len(train_y) + len(val_y) == len(all_y) == 1797
    assert 0.0 <= all_x.min() and all_x.max() == 1.0
    assert np.bincount(val_y).tolist() == [round(c * 0.2) for c in np.bincount(all_y)]
    train_rows = {row.tobytes() for row in train_x}
    assert sum(row.tobytes() in train_rows for row in val_x) <= 2     # a few digits are duplicated in the source
    again_x, _ = digits_source("val")
    np.testing.assert_array_equal(again_x, val_x)
    assert not np.array_equal(digits_source("val", split_seed=1)[0], val_x)


def test_canvas_is_a_pure_function_of_seed_epoch_and_index(digits):
    a = make(digits, seed=3, resample_per_epoch=True)
    b = make(digits, seed=3, resample_per_epoch=True)
    forward = [a[i][0] for i in (5, 2, 9)]
    backward = [b[i][0] for i in (9, 2, 5)][::-1]
    for x, y in zip(forward, backward):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not torch.equal(a[5][0], a[6][0])
    assert not torch.equal(make(digits, seed=4)[5][0], a[5][0])
    a.set_epoch(1)
    assert not torch.equal(a[5][0], forward[0])
    b.set_epoch(1)
    assert torch.equal(a[5][0], b[5][0])
    fixed = make(digits, seed=3, resample_per_epoch=False)
    first = fixed[5][0]
    fixed.set_epoch(7)
    assert torch.equal(fixed[5][0], first)


def test_object_lies_in_its_box_and_keeps_its_label(digits):
    images, labels = digits
    ds = make(digits, num_distractors=0, noise_std=0.0, background=0.0, length=3 * len(labels))
    for index in (0, 17, len(labels) + 17):
        sample = ds.render(index)
        x0, y0, x1, y1 = (int(v) for v in sample.box)
        assert sample.source_index == index % len(labels) and sample.label == int(labels[index % len(labels)])
        assert 10 <= max(x1 - x0, y1 - y0) <= 16
        inside = torch.zeros_like(sample.image, dtype=torch.bool)
        inside[:, y0:y1, x0:x1] = True
        assert sample.image[~inside].abs().max() == 0
        assert sample.image[inside].max() > 0.5
        torch.testing.assert_close(sample.image[0], sample.image[2])                  # grey in 3 channels


def test_clutter_adds_ink_outside_the_box(digits):
    clean = make(digits, num_distractors=0, noise_std=0.0, background=0.0)
    busy = make(digits, num_distractors=(6, 6), noise_std=0.0, background=0.0)
    sample = busy.render(4)
    x0, y0, x1, y1 = (int(v) for v in sample.box)
    mask = torch.ones(48, 48, dtype=torch.bool)
    mask[y0:y1, x0:x1] = False
    assert sample.image[0][mask].max() > 0.1
    other = clean.render(4)
    x0, y0, x1, y1 = (int(v) for v in other.box)
    mask = torch.ones(48, 48, dtype=torch.bool)
    mask[y0:y1, x0:x1] = False
    assert other.image[0][mask].max() == 0


def test_output_size_is_an_area_average_and_scales_the_box(digits):
    full = make(digits, seed=1)
    half = make(digits, seed=1, output_size=24)
    big, small = full.render(8), half.render(8)
    assert small.image.shape == (3, 24, 24)
    assert small.box == tuple(v / 2 for v in big.box)
    expected = big.image.reshape(3, 24, 2, 24, 2).mean(dim=(2, 4))
    torch.testing.assert_close(small.image, expected, rtol=0, atol=1e-6)


def test_normalisation_and_getitem(digits):
    ds = make(digits, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    image, label = ds[3]
    torch.testing.assert_close(image, (ds.render(3).image - 0.5) / 0.25)
    assert label == ds.render(3).label and ds.num_classes == 10


@pytest.mark.parametrize("output_size", [None, 24])
def test_rendering_without_the_mask_gives_the_same_canvas(digits, output_size):
    """Training samples skip the mask; the pixels, label and box are exactly the masked render's."""
    ds = make(digits, output_size=output_size)
    for index in range(6):
        full, fast = ds.render(index), ds.render(index, with_mask=False)
        assert fast.mask is None and full.mask is not None
        assert torch.equal(fast.image, full.image) and (fast.label, fast.box) == (full.label, full.box)


@pytest.mark.parametrize("kwargs, message", [
    (dict(object_size=(8, 60)), "object_size must lie in [1, canvas_size=48], got (8, 60)"),
    (dict(object_size=(12, 8)), "object_size must satisfy low <= high, got (12, 8)"),
    (dict(object_size="big"), "object_size must be a number or a (low, high) pair, got 'big'"),
    (dict(num_distractors=(-1, 2)), "num_distractors must be >= 0, got (-1, 2)"),
    (dict(fragment_fraction=(0.0, 0.5)), "fragment_fraction must lie in (0, 1], got (0.0, 0.5)"),
    (dict(output_size=64), "output_size must be an int in [1, canvas_size=48], got 64"),
    (dict(tint=True, channels=1), "tint=True needs channels=3, got channels=1"),
    (dict(length=0), "length must be a positive int, got 0"),
    (dict(noise_std=-0.1), "noise_std must be >= 0, got -0.1"),
])
def test_bad_arguments_are_named(digits, kwargs, message):
    with pytest.raises(ValueError) as err:
        make(digits, **kwargs)
    assert str(err.value) == message


def test_bad_sources_and_indices(digits):
    images, labels = digits
    with pytest.raises(ValueError, match=r"images must be a non-empty \(M, h, w\) or \(M, h, w, c\) array, got shape \(8, 8\)"):
        ClutteredCanvas(images[0], labels[:1])
    with pytest.raises(ValueError, match=r"labels must be an integer array of shape \(3,\), got float64 \(3,\)"):
        ClutteredCanvas(images[:3], np.zeros(3))
    with pytest.raises(IndexError, match="index 5 out of range for a ClutteredCanvas of length 5"):
        ClutteredCanvas(images[:5], labels[:5]).render(5)
    rgb = (np.random.default_rng(0).random((4, 6, 6, 3)) * 255).astype(np.uint8)
    sample = ClutteredCanvas(rgb, np.arange(4), canvas_size=16, object_size=6, num_distractors=0, noise_std=0,
                             background=0).render(1)
    assert sample.image.shape == (3, 16, 16) and sample.image.max() <= 1.0
    with pytest.raises(ValueError, match="images have 3 channels; channels=1 takes sources with 1"):
        ClutteredCanvas(rgb, np.arange(4), canvas_size=16, object_size=6, channels=1)


def test_mask_is_the_objects_own_ink_inside_its_box(digits):
    from dartmamba.data import MASK_THRESHOLD

    clean = make(digits, num_distractors=0, noise_std=0.0, background=0.0, seed=5)
    cluttered = make(digits, num_distractors=(6, 8), noise_std=0.0, background=0.0, seed=5)
    for index in (3, 40):
        sample = clean.render(index)
        x0, y0, x1, y1 = (int(v) for v in sample.box)
        assert sample.mask.shape == sample.image.shape[1:] and sample.mask.dtype == torch.float32
        assert set(sample.mask.unique().tolist()) == {0.0, 1.0}
        inside = torch.zeros_like(sample.mask, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert sample.mask[~inside].sum() == 0 and sample.mask.sum() > 10
        # without clutter, the mask is exactly where the object's ink reaches the threshold
        torch.testing.assert_close(sample.mask, (sample.image[0] >= MASK_THRESHOLD).float(), rtol=0, atol=0)
        # clutter adds ink but never mask: every masked pixel still shows the object's ink
        other = cluttered.render(index)
        assert (other.image[0][other.mask > 0] >= MASK_THRESHOLD).all()
        assert ((other.image[0] >= MASK_THRESHOLD) & (other.mask == 0)).sum() > 0


def test_mask_is_area_averaged_with_the_image(digits):
    full = make(digits, seed=2).render(7)
    half = make(digits, seed=2, output_size=24).render(7)
    torch.testing.assert_close(half.mask, full.mask.reshape(24, 2, 24, 2).mean(dim=(1, 3)))
    assert ((half.mask > 0) & (half.mask < 1)).any()           # a soft coverage fraction at the edges
