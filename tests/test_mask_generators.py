"""moebius.mask_generators: determinism, shapes, hole fractions (spec 4.3), the LaMa rules."""

import numpy as np
import pytest

import moebius.mask_generators as mg
from moebius.mask_generators import LAMA_PRESETS, PROTOCOLS, random_mask


def test_protocol_names():
    from moebius.options import MASK_PROTOCOLS

    assert tuple(PROTOCOLS) == MASK_PROTOCOLS  # the CLI's choices, importable without numpy
    assert list(PROTOCOLS) == [
        "thin_256",
        "thin_512",
        "medium_256",
        "medium_512",
        "thick_256",
        "thick_512",
        "area_40_50",
    ]
    # spec 4.3 table, spot checks
    assert LAMA_PRESETS["thick_512"].irregular == mg.IrregularConfig(1, 5, 250, 450, 4)
    assert LAMA_PRESETS["thick_512"].box == mg.BoxConfig(10, 30, 300, 1, 4)
    assert LAMA_PRESETS["thin_512"].box is None
    assert LAMA_PRESETS["medium_512"].irregular_probability == pytest.approx(1 / 1.3)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("size", [(512, 512), (340, 512), (256, 200)])
def test_every_protocol_makes_masks(protocol, size):
    rng = np.random.default_rng(1)
    masks = [random_mask(protocol, *size, rng) for _ in range(5)]
    for mask in masks:
        assert mask.dtype == bool and mask.shape == size
    fractions = [m.mean() for m in masks]
    assert max(fractions) > 0.01 and min(fractions) < 0.99
    assert len({m.tobytes() for m in masks}) >= 3  # draws differ (thick_512 may fill 256x200)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_same_seed_same_mask(protocol):
    a = [random_mask(protocol, 256, 256, np.random.default_rng(7)) for _ in range(2)]
    b = random_mask(protocol, 256, 256, np.random.default_rng(8))
    assert np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b)


def test_no_global_random_state_used():
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    random_mask("medium_512", 128, 128, np.random.default_rng(0))
    assert np.random.random() == before


@pytest.mark.parametrize("size", [(512, 512), (341, 512), (64, 96)])
def test_area_40_50_always_in_range(size):
    rng = np.random.default_rng(3)
    fractions = np.array([random_mask("area_40_50", *size, rng).mean() for _ in range(40)])
    assert fractions.min() >= 0.40 and fractions.max() <= 0.50
    assert fractions.max() - fractions.min() > 0.04  # spread over the interval, not one value


@pytest.mark.parametrize(("protocol", "spec_mean", "tol"), [
    ("medium_512", 0.315, 0.08),  # 40 masks: sample std ~0.17 -> 3 standard errors ~0.08
    ("thick_512", 0.49, 0.12),  # sample std ~0.26 -> 3 standard errors ~0.12
])  # fmt: skip
def test_mean_hole_fraction_matches_spec(protocol, spec_mean, tol):
    rng = np.random.default_rng(2026)
    fractions = np.array([random_mask(protocol, 512, 512, rng).mean() for _ in range(40)])
    assert abs(fractions.mean() - spec_mean) < tol
    assert 3 * fractions.std() / np.sqrt(40) < tol  # the tolerance is not looser than 3 SE needs


def test_stroke_count_has_the_off_by_one(monkeypatch):
    calls = []
    monkeypatch.setattr(mg, "draw_stroke", lambda canvas, cfg, rng, mirror: calls.append(mirror))
    cfg = mg.IrregularConfig(min_times=1, max_times=2, max_width=10, max_len=10)
    counts = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        calls.clear()
        mg.irregular_mask(64, 64, cfg, rng)
        counts.add(len(calls))
        assert calls == [i % 2 == 0 for i in range(len(calls))]  # even strokes mirrored
    assert counts == {1, 2, 3}  # {min_times, ..., max_times + 1}


def test_kind_probabilities_are_normalised(monkeypatch):
    kinds = []
    monkeypatch.setattr(mg, "irregular_mask", lambda *a: kinds.append("irregular"))
    monkeypatch.setattr(mg, "box_mask", lambda *a: kinds.append("box"))
    rng = np.random.default_rng(0)
    for _ in range(4000):
        mg.mixed_mask(64, 64, LAMA_PRESETS["medium_512"], rng)
    share = kinds.count("irregular") / len(kinds)
    assert abs(share - 1 / 1.3) < 0.02  # 0.769; binomial SE 0.0067


def test_boxes_respect_sizes_and_margin():
    cfg = mg.BoxConfig(margin=10, min_size=30, max_size=300, min_times=1, max_times=1)
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(300):
        mask = mg.box_mask(320, 512, cfg, rng)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert rows[0] >= 10 and cols[0] >= 10 and rows[-1] < 310 and cols[-1] < 502
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert mask.sum() == height * width  # one solid rectangle
        sides += [height, width]
    assert min(sides) >= 30 and max(sides) <= 300  # upper bound min(300, 320 - 20) = 300
    assert max(sides) >= 290


def test_bad_arguments_teach():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="choose one of thin_256"):
        random_mask("medium", 64, 64, rng)
    with pytest.raises(TypeError, match="default_rng"):
        random_mask("medium_512", 64, 64, np.random.RandomState(0))
    with pytest.raises(ValueError, match="height must be a positive integer"):
        random_mask("medium_512", 0, 64, rng)
    with pytest.raises(ValueError, match="larger than 20 pixels"):
        mg.box_mask(15, 64, LAMA_PRESETS["thick_512"].box, rng)
