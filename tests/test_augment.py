import numpy as np
import pytest

from twostage_ad.config import AugmentConfig
from twostage_ad.data.augment import BlobDefect, apply_defect, build_defect_augmentation, perlin_noise, synthetic_defects

from conftest import textured

KINDS = ["cutout", "cutpaste", "blob", "crack"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_defect_changes_the_image_exactly_where_its_mask_says(kind, channels, rng):
    image = textured(rng, size=64, channels=3)[..., :channels]
    augmentation = build_defect_augmentation(AugmentConfig(kinds=[kind]), seed=3)
    hits = 0
    for _ in range(10):
        out, mask = apply_defect(augmentation, image, texture=textured(rng, size=64, channels=3)[..., :channels])
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1}
        changed = np.abs(out.astype(int) - image.astype(int)).max(axis=-1) > 0
        defect = mask == 0
        assert not np.any(changed & ~defect & (np.abs(out.astype(int) - image.astype(int)).max(axis=-1) > 4))
        hits += defect.any()
    assert hits >= 8  # a defect nearly every time (a rare invisible one is allowed)


@pytest.mark.parametrize("kind", ["blob", "cutout", "cutpaste"])
@pytest.mark.parametrize("max_area", [0.02, 0.1])
def test_defects_stay_below_the_area_limit(rng, kind, max_area):
    image = textured(rng, size=64)
    augmentation = build_defect_augmentation(AugmentConfig(kinds=[kind], max_area=max_area), seed=0)
    areas = [1 - apply_defect(augmentation, image)[1].mean() for _ in range(20)]
    assert max(areas) <= max_area + 1e-6 and max(areas) > 0


def test_same_seed_same_defects_different_seed_different(rng):
    image = textured(rng, size=64)
    a = build_defect_augmentation(AugmentConfig(), seed=5)
    b = build_defect_augmentation(AugmentConfig(), seed=5)
    c = build_defect_augmentation(AugmentConfig(), seed=6)
    outs_a = [apply_defect(a, image)[1] for _ in range(5)]
    outs_b = [apply_defect(b, image)[1] for _ in range(5)]
    outs_c = [apply_defect(c, image)[1] for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not all(np.array_equal(x, y) for x, y in zip(outs_a, outs_c))


def test_perlin_noise_is_smooth_and_bounded():
    noise = perlin_noise(64, 64, 4, np.random.default_rng(0))
    assert noise.shape == (64, 64)
    assert np.abs(noise).max() <= 1.5
    assert np.abs(np.diff(noise, axis=0)).max() < 0.3  # neighbouring pixels are close


def test_blob_opacity_floor_sets_how_faint_a_blob_may_be(rng):
    """Same seed, same blob shapes: with the floor at 1 every blob is at full strength, with 0.1 some are
    fainter (on a black image, darker), and a fainter blob's visible mask lies inside the opaque one's."""
    image = np.zeros((64, 64, 1), np.uint8)
    texture = np.full((64, 64, 1), 200, np.uint8)
    opaque = build_defect_augmentation(AugmentConfig(kinds=["blob"], blob_opacity_min=1.0), seed=0)
    faint = build_defect_augmentation(AugmentConfig(kinds=["blob"], blob_opacity_min=0.1), seed=0)
    fainter = 0
    for _ in range(40):
        out_opaque, mask_opaque = apply_defect(opaque, image, texture=texture)
        out_faint, mask_faint = apply_defect(faint, image, texture=texture)
        assert np.all(mask_opaque <= mask_faint)  # 0 marks the defect
        assert np.all(out_opaque >= out_faint)
        fainter += bool(np.any(out_opaque > out_faint))
    assert fainter >= 10
    with pytest.raises(ValueError, match="blob_opacity_min"):
        AugmentConfig(blob_opacity_min=0.0).validate()


def _blob_areas(draws: int = 200, **kwargs) -> np.ndarray:
    """Share of a 64×64 image each blob's region covers."""
    blob = BlobDefect(**kwargs)
    blob.set_random_seed(0)
    image = np.zeros((64, 64, 1), np.uint8)
    return np.array([(blob.make_defect(image, None)[1] > 0).mean() for _ in range(draws)])


def test_blob_area_draw_spreads_blobs_between_the_floor_and_max_area():
    """Log-uniform from 0.1 %: half the blobs below √(0.001·0.25) ≈ 1.6 %; uniform from 0.5 %: half
    above (0.005 + 0.25) / 2 ≈ 13 %; both stay inside [floor, max_area] up to a pixel of rounding."""
    log_uniform = _blob_areas()
    uniform = _blob_areas(area_min=0.005, area_draw="uniform")
    pixel = 1 / 64**2
    assert log_uniform.min() >= 0.001 - 2 * pixel and uniform.min() >= 0.005 - 2 * pixel
    assert max(log_uniform.max(), uniform.max()) <= 0.25 + 2 * pixel
    assert np.median(log_uniform) < 0.03 and np.median(uniform) > 0.09
    with pytest.raises(ValueError, match="area_draw must be one of"):
        BlobDefect(area_draw="normal")
    with pytest.raises(ValueError, match="blob_area_draw"):
        AugmentConfig(blob_area_draw="normal").validate()
    with pytest.raises(ValueError, match="blob_area_min"):
        AugmentConfig(blob_area_min=0.0).validate()


def test_default_blob_area_is_the_log_uniform_draw_from_a_tenth_of_a_percent():
    """The defaults reproduce the draw every recorded run used, number for number: the same
    generator state gives exp(U(log 0.001, log max_area))."""
    blob = BlobDefect(max_area=0.25)
    blob.set_random_seed(7)
    reference = np.random.Generator(type(blob.random_generator.bit_generator)())
    reference.bit_generator.state = blob.random_generator.bit_generator.state  # the same stream, copied
    for _ in range(5):
        assert blob._area() == float(np.exp(reference.uniform(np.log(0.001), np.log(0.25))))
    capped = BlobDefect(max_area=0.0005)
    capped.set_random_seed(0)
    assert capped._area() == pytest.approx(0.0005)  # the floor is capped at max_area: every blob that size
    with pytest.raises(ValueError, match="area_min must be > 0"):
        BlobDefect(area_min=0.0)


def test_blob_area_settings_reach_the_training_augmentation():
    """augment.blob_area_* set what build_defect_augmentation draws: uniform from 5 % gives far larger
    defects than the default log-uniform from 0.1 % (a black image, an opaque white texture)."""
    image, texture = np.zeros((64, 64, 1), np.uint8), np.full((64, 64, 1), 255, np.uint8)

    def mean_area(config: AugmentConfig) -> float:
        augmentation = build_defect_augmentation(config, seed=0)
        return float(np.mean([(apply_defect(augmentation, image, texture=texture)[1] == 0).mean() for _ in range(60)]))

    default = mean_area(AugmentConfig(kinds=["blob"], blob_opacity_min=1.0))
    large = mean_area(AugmentConfig(kinds=["blob"], blob_opacity_min=1.0, blob_area_min=0.05, blob_area_draw="uniform"))
    assert large > 2 * default


def test_synthetic_validation_ignores_training_blob_settings(rng):
    """The validation defects are a fixed yardstick: changing how training draws blobs (area, opacity)
    leaves them byte for byte the same, while another max_area changes them."""
    images = np.stack([textured(rng, size=48, channels=3) for _ in range(12)])
    reference = synthetic_defects(images, AugmentConfig(), seed=1)
    changed = synthetic_defects(images, AugmentConfig(blob_area_min=0.05, blob_area_draw="uniform", blob_opacity_min=1.0), seed=1)
    assert reference[2] == changed[2]
    np.testing.assert_array_equal(reference[0], changed[0])
    np.testing.assert_array_equal(reference[1], changed[1])
    assert not np.array_equal(reference[0], synthetic_defects(images, AugmentConfig(max_area=0.6), seed=1)[0])
