"""Stage 1 scoring is deterministic: same image, same numbers, whatever batch it is in."""

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from twostage_ad import device as device_module
from twostage_ad.config import AugmentConfig, Stage1Config
from twostage_ad.data.images import to_tensor
from twostage_ad.device import has_fast_bf16
from twostage_ad.models.attention_net import AttentionNet
from twostage_ad.stages.attention import (
    SCREENING_COMPONENTS,
    AttentionStage,
    DefectDataset,
    screening_loss,
    screening_scores,
)
from twostage_ad.stages.losses import attention_bce

from conftest import ALL_OBJECTIVES, textured


@pytest.fixture(scope="module")
def fitted_stage():
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(12)])
    config = Stage1Config(min_steps=0, epochs=1, base_width=8, max_width=16, batch_size=6, **ALL_OBJECTIVES)
    return AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=0).fit(images, progress=False), images


def test_same_image_same_loss_alone_or_in_different_batches(fitted_stage):
    stage, images = fitted_stage
    rng = np.random.default_rng(1)
    others = np.stack([textured(rng, size=32)[..., None] for _ in range(7)])
    target = images[3:4]
    alone = stage.score(target, batch_size=1, progress=False)
    twice = stage.score(target, batch_size=1, progress=False)
    in_batch_a = stage.score(np.concatenate([others[:5], target, others[5:]]), batch_size=8, progress=False)
    in_batch_b = stage.score(np.concatenate([target, others[:2]]), batch_size=3, progress=False)
    assert alone.loss[0] == twice.loss[0]
    for other, index in ((in_batch_a, 5), (in_batch_b, 0)):
        assert other.loss[index] == pytest.approx(alone.loss[0], rel=1e-5, abs=1e-7)
        for name in SCREENING_COMPONENTS:
            assert other.components[name][index] == pytest.approx(alone.components[name][0], rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(other.anomaly_maps[index], alone.anomaly_maps[0], rtol=1e-5, atol=1e-6)


def test_scoring_does_not_depend_on_train_mode_or_global_rng(fitted_stage):
    stage, images = fitted_stage
    first = stage.score(images[:4], progress=False)
    stage.model_.train()  # score() must switch to eval itself
    torch.manual_seed(123)
    second = stage.score(images[:4], progress=False)
    assert stage.model_.training is False
    np.testing.assert_array_equal(first.loss, second.loss)


def test_screening_loss_is_the_documented_weighted_sum(fitted_stage):
    stage, images = fitted_stage
    result = stage.score(images[:3], progress=False)
    c = {k: result.components[k] for k in SCREENING_COMPONENTS}
    config = Stage1Config(screen_con=2.0, screen_enc=0.0, screen_att=3.0, screen_feature=0.0)
    np.testing.assert_allclose(screening_loss(c, config), 2.0 * c["stage1_recon"] + 3.0 * c["stage1_att_topk"])
    np.testing.assert_allclose(result.loss, screening_loss(c, stage.config, stage.features_))
    f = stage.features_  # the attention and feature terms in z units of the training normals, the rest raw
    expected = (stage.config.screen_con * c["stage1_recon"] + stage.config.screen_enc * c["stage1_latent"]
                + stage.config.screen_att * (c["stage1_att_topk"] - f.attention_mean) / f.attention_std
                + stage.config.screen_feature * (c["stage1_feature"] - f.feature_mean) / f.feature_std)
    np.testing.assert_allclose(result.loss, expected, rtol=1e-5)
    assert result.anomaly_maps.shape == (3, 32, 32)
    assert np.all((result.anomaly_maps >= 0) & (result.anomaly_maps <= 1))


def test_training_is_reproducible_with_a_seed():
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    config = Stage1Config(min_steps=0, epochs=1, base_width=4, max_width=8, batch_size=4, **ALL_OBJECTIVES)
    a = AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=7).fit(images, progress=False)
    b = AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=7).fit(images, progress=False)
    np.testing.assert_allclose(a.score(images, progress=False).loss, b.score(images, progress=False).loss, rtol=1e-6)


def test_checkpoint_round_trip_gives_identical_scores(tmp_path, fitted_stage):
    stage, images = fitted_stage
    stage.save(tmp_path / "s1.pt")
    loaded = AttentionStage.load(tmp_path / "s1.pt", device="cpu")
    np.testing.assert_array_equal(stage.score(images, progress=False).loss, loaded.score(images, progress=False).loss)


def test_defect_dataset_rows_have_masks_matching_their_kind():
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(4)])
    dataset = DefectDataset(images, AugmentConfig(probability=0.5), seed=0)
    rows = [dataset[i % 4] for i in range(40)]
    defect_rows = [r for r in rows if r[3]]
    clean_rows = [r for r in rows if not r[3]]
    assert 8 <= len(defect_rows) <= 32
    assert all(torch.equal(r[0], r[1]) and r[2].min() == 1 for r in clean_rows)
    assert sum(r[2].min() == 0 for r in defect_rows) >= len(defect_rows) - 2


@pytest.mark.parametrize("bias", [-3.0, 0.0, 3.0])
def test_lower_attention_means_higher_loss_and_hotter_map(bias):
    """Score direction: A -> 0 (anomalous) must raise the screening loss and the map."""
    torch.manual_seed(0)
    net = AttentionNet(1, 32, base_width=4, max_width=8)
    torch.nn.init.zeros_(net.attention_head.weight)
    images = np.full((1, 32, 32, 1), 128, np.uint8)
    config = Stage1Config(screen_con=0.0, screen_enc=0.0, screen_att=1.0, screen_feature=0.0)
    results = []
    for b in (bias, bias - 2.0):  # second one looks more anomalous
        torch.nn.init.constant_(net.attention_head.bias, b)
        results.append(screening_scores(net, images, config, torch.device("cpu"), progress=False))
    normal, anomalous = results
    assert anomalous.loss[0] > normal.loss[0]
    assert anomalous.anomaly_maps.mean() > normal.anomaly_maps.mean()
    expected = np.log1p(np.exp(-bias))  # BCE of sigmoid(bias) against "normal" = softplus(-bias)
    assert normal.loss[0] == pytest.approx(expected, rel=1e-5)


def test_balanced_bce_weighs_defect_and_normal_pixels_equally():
    mask = torch.ones(1, 1, 10, 10)
    mask[..., 0, 0] = 0  # one defect pixel out of 100
    logits = torch.full((1, 1, 10, 10), 2.0)  # everything called normal
    per_pixel_defect = torch.nn.functional.softplus(torch.tensor(2.0)).item()  # BCE(2, target 0)
    per_pixel_normal = torch.nn.functional.softplus(torch.tensor(-2.0)).item()  # BCE(2, target 1)
    plain = attention_bce(logits, mask, balanced=False).item()
    balanced = attention_bce(logits, mask, balanced=True).item()
    assert plain == pytest.approx(0.01 * per_pixel_defect + 0.99 * per_pixel_normal, rel=1e-5)
    assert balanced == pytest.approx(0.5 * (per_pixel_defect + per_pixel_normal), rel=1e-5)
    clean = attention_bce(logits, torch.ones_like(mask), balanced=True).item()
    assert clean == pytest.approx(per_pixel_normal, rel=1e-5)


def test_att_balanced_reaches_the_training_loss():
    """The same seed and batches train to the same loss twice, and to another one on the plain mean BCE."""
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])

    def attention_loss(balanced: bool) -> float:
        config = Stage1Config(min_steps=0, epochs=1, base_width=4, max_width=8, batch_size=4, att_balanced=balanced)
        return AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=0).fit(images, progress=False).history_[-1]["attention"]

    balanced = attention_loss(True)
    assert attention_loss(True) == balanced
    assert abs(attention_loss(False) - balanced) > 1e-3


@pytest.mark.parametrize("w_adv", [0.0, 0.5])
def test_adversarial_branch_is_built_and_trained_only_when_weighted(tmp_path, w_adv):
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    config = Stage1Config(min_steps=0, epochs=2, base_width=4, max_width=8, batch_size=4, w_adv=w_adv, w_con=0.1)
    stage = AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=0)
    stage.fit(images, checkpoint_path=tmp_path / "s1.pt", progress=False)
    history = stage.history_[-1]
    assert ("adversarial" in history) == (w_adv > 0) and ("discriminator" in history) == (w_adv > 0)
    assert all(np.isfinite(v) for v in history.values())
    loaded = AttentionStage.load(tmp_path / "s1.pt", device="cpu")
    assert (loaded.discriminator_ is None) == (w_adv == 0)
    assert [h["epoch"] for h in loaded.history_] == [1, 2]


def test_collapsed_discriminator_is_reinitialised_and_logged(monkeypatch, caplog):
    from twostage_ad.stages import training

    monkeypatch.setattr(training, "COLLAPSE_LOSS", 10.0)  # every step counts as collapsed
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    config = Stage1Config(min_steps=0, epochs=1, base_width=8, max_width=16, batch_size=4, w_adv=0.1)
    stage = AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=0)
    with caplog.at_level("WARNING"):
        stage.fit(images, progress=False)
    assert stage.history_[-1]["discriminator_resets"] == 2 and "re-initialised" in caplog.text


def test_reinitialise_discriminator_draws_fresh_weights_and_forgets_the_optimiser():
    from twostage_ad.models.attention_net import ImageMapDiscriminator
    from twostage_ad.stages.training import reinitialise_discriminator

    disc = ImageMapDiscriminator(1, 32, base_width=8, max_width=16)
    optimizer = torch.optim.Adam(disc.parameters())
    disc(torch.randn(2, 1, 32, 32), torch.rand(2, 1, 32, 32))[0].mean().backward()
    optimizer.step()
    with torch.no_grad():
        for parameter in disc.parameters():
            parameter.zero_()
    reinitialise_discriminator(disc, optimizer)
    conv_weights = [m.weight for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.abs().sum() > 0 for w in conv_weights) and len(optimizer.state) == 0


def test_attention_only_training_skips_reconstruction_and_screening_stays_finite():
    """With every x̂ / ẑ weight at 0, their modules are never run (nor trained), and the screening
    loss is the attention term alone, not NaN from the skipped components."""
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    config = Stage1Config(min_steps=0, epochs=1, base_width=8, max_width=16, batch_size=4, w_con=0.0, w_rep=0.0, w_enc=0.0, w_adv=0.0,
                          screen_con=0.0, screen_enc=0.0, screen_feature=0.0)
    torch.manual_seed(0)
    untrained = AttentionNet(1, 32, base_width=8, max_width=16, separate_reconstruction=True).latent_encoder.state_dict()
    stage = AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=0).fit(images, progress=False)
    for name, value in stage.model_.latent_encoder.state_dict().items():
        assert torch.equal(value, untrained[name]), name  # untouched: no forward, no gradient, no update
    result = stage.score(images, progress=False)
    assert np.isnan(result.components["stage1_recon"]).all() and np.isnan(result.components["stage1_latent"]).all()
    np.testing.assert_array_equal(result.loss, result.components["stage1_att_topk"])
    out = stage.model_(torch.zeros(1, 1, 32, 32), reconstruct=False)
    assert out.reconstruction is None and out.latent_reconstructed is None


def test_an_ensemble_member_trains_exactly_as_it_would_alone(tmp_path):
    """Members share batches and synthetic defects but not gradients: member 0 (the first weights
    drawn) ends where a single network with the same seed ends; member 1 started elsewhere."""
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    attention_only = dict(min_steps=0, epochs=2, base_width=8, max_width=16, batch_size=4, w_con=0.0, w_rep=0.0, w_enc=0.0,
                          w_adv=0.0, screen_con=0.0, screen_enc=0.0, feature_map_weight=0.0)
    single = AttentionStage(config=Stage1Config(**attention_only), image_size=32, channels=1, device="cpu", seed=3)
    single.fit(images, progress=False)
    pair = AttentionStage(config=Stage1Config(**attention_only, ensemble_size=2), image_size=32, channels=1, device="cpu", seed=3)
    pair.fit(images, checkpoint_path=tmp_path / "stage1.pt", progress=False)
    first, second = pair.model_.members
    for name, value in single.model_.state_dict().items():
        torch.testing.assert_close(first.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(second.attention_head.weight, first.attention_head.weight)
    assert pair.history_[-1]["attention"] != pytest.approx(single.history_[-1]["attention"], rel=1e-3)  # a mean of two
    result = pair.score(images, progress=False)
    x = to_tensor(images)
    with torch.no_grad():
        mean_logits = (first(x, reconstruct=False).attention_logits + second(x, reconstruct=False).attention_logits) / 2
    np.testing.assert_allclose(result.anomaly_maps, 1 - torch.sigmoid(mean_logits)[:, 0].numpy(), atol=1e-5)
    reloaded = AttentionStage.load(tmp_path / "stage1.pt", device="cpu")
    np.testing.assert_allclose(reloaded.score(images, progress=False).loss, result.loss, rtol=1e-6)


def test_channels_last_is_a_layout_not_a_different_model(fitted_stage):
    stage, images = fitted_stage
    assert stage.channels_last
    assert stage.model_.encoder.blocks[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = stage.score(images, progress=False)
    stage.model_.to(memory_format=torch.contiguous_format)
    try:
        nchw = stage.score(images, progress=False)
    finally:
        stage.model_.to(memory_format=torch.channels_last)
    np.testing.assert_allclose(nhwc.loss, nchw.loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nhwc.anomaly_maps, nchw.anomaly_maps, atol=1e-5)


def test_bf16_scoring_runs_the_network_in_bf16_and_returns_float32(fitted_stage):
    stage, images = fitted_stage
    original = stage.config
    stage.config = replace(original, screen_con=0.0, screen_enc=0.0)  # bf16 scoring needs attention-only screening
    try:
        full = stage.score(images, progress=False)
        stage.precision = "bf16"
        half = stage.score(images, progress=False)
    finally:
        stage.config, stage.precision = original, "float32"
    assert half.loss.dtype == np.float32 and half.anomaly_maps.dtype == np.float32
    assert not np.array_equal(half.anomaly_maps, full.anomaly_maps)  # the network did run in bf16
    # bf16 keeps ~3 significant digits of the BCE; the position mean subtracted after it can leave values near 0
    np.testing.assert_allclose(half.loss, full.loss, rtol=0.05, atol=0.05 * float(np.abs(full.loss).max()))
    np.testing.assert_allclose(half.anomaly_maps, full.anomaly_maps, atol=0.02)


def test_bf16_scoring_warns_where_bf16_would_be_emulated(fitted_stage, monkeypatch):
    stage, images = fitted_stage
    monkeypatch.setattr("twostage_ad.device.has_fast_bf16", lambda device: False)
    original = stage.config
    stage.config = replace(original, screen_con=0.0, screen_enc=0.0)
    stage.precision = "bf16"
    try:
        with pytest.warns(RuntimeWarning, match="has no native bf16"):
            stage.score(images[:2], progress=False)
    finally:
        stage.config, stage.precision = original, "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stage.score(images[:2], progress=False)  # float32 scoring: nothing to warn about


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    real_path = device_module.Path

    def fake_path(name):
        return cpuinfo if name == "/proc/cpuinfo" else real_path(name)

    monkeypatch.setattr(device_module, "Path", fake_path)
    # kernels free to use AVX-512 (whatever this process's ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpuinfo.write_text("flags : fpu avx512f avx512bw avx512vl\n")  # AVX-512 without bf16: emulated
    assert not has_fast_bf16(torch.device("cpu"))
    cpuinfo.write_text("flags : fpu avx512f avx512_bf16\n")
    assert has_fast_bf16(torch.device("cpu"))
    # the same CPU with its kernels held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 or ATEN_CPU_CAPABILITY=avx2): emulated
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not has_fast_bf16(torch.device("cpu"))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not has_fast_bf16(torch.device("cpu"))


def test_reconstruct_then_attend_trains_its_repair_and_scores_deterministically(tmp_path):
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    config = Stage1Config(min_steps=0, epochs=2, base_width=8, max_width=16, batch_size=4, repair=True)
    stage = AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=0)
    stage.fit(images, checkpoint_path=tmp_path / "s1.pt", progress=False)
    assert {"repair_l2", "repair_ssim"} <= set(stage.history_[-1])
    assert stage.history_[-1]["repair_l2"] < stage.history_[0]["repair_l2"]  # the repair learns
    first = stage.score(images, progress=False)
    loaded = AttentionStage.load(tmp_path / "s1.pt", device="cpu")
    np.testing.assert_array_equal(loaded.score(images, progress=False).loss, first.loss)
    alone = stage.score(images[2:3], batch_size=1, progress=False)
    assert alone.loss[0] == pytest.approx(first.loss[2], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("field, value", [("w_con", 1.0), ("ensemble_size", 2), ("w_repair_l2", 0.0)])
def test_reconstruct_then_attend_refuses_what_it_cannot_combine(field, value):
    from twostage_ad.config import ConfigError

    settings = {"repair": True, field: value}
    if field == "w_repair_l2":
        settings["w_repair_ssim"] = 0.0
    with pytest.raises(ConfigError, match=f"stage1.{field}"):
        Stage1Config(**settings).validate()
