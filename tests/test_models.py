"""Every network: output shapes, no NaNs, a gradient reaching every parameter, argument checks."""

import pytest
import torch
import torch.nn.functional as F

from twostage_ad.models.attention_net import AttentionNet, AttentionNetEnsemble, ImageMapDiscriminator, kv_pool_for
from twostage_ad.models.blocks import CBAM, AffineInstanceNorm2d, SelfAttention2d, SingleChannelConv2d, UpBlock
from twostage_ad.models.ganomaly2d import GANomaly2D, PatchDiscriminator, patch_widths
from twostage_ad.models.patch_head import HEAD_CELL, DefectHead, GANomaly2DWithHead
from twostage_ad.models.repair_net import RepairNet, RepairThenAttend
from twostage_ad.stages.patch_scorer import cell_mask


def _open_gates(module: torch.nn.Module) -> None:
    """SAGAN's γ starts at 0, which blocks gradients to q/k/v; open it so the test can see them."""
    for sub in module.modules():
        if isinstance(sub, SelfAttention2d):
            torch.nn.init.constant_(sub.gamma, 0.5)


def _assert_all_parameters_get_gradients(module: torch.nn.Module) -> None:
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(parameter.grad).all(), f"non-finite gradient in {name}"
        assert parameter.grad.abs().sum() > 0, f"zero gradient in {name}"


@pytest.mark.parametrize("size, channels", [(32, 1), (64, 3)])
def test_attention_net_shapes_finiteness_and_gradients(size, channels):
    torch.manual_seed(0)
    net = AttentionNet(channels, size, base_width=8, max_width=32)
    _open_gates(net)
    x = torch.rand(2, channels, size, size) * 2 - 1
    out = net(x)
    assert out.reconstruction.shape == x.shape
    assert out.attention_logits.shape == (2, 1, size, size)
    assert out.latent.shape == out.latent_reconstructed.shape == (2, 32, 4, 4)
    assert out.reconstruction.abs().max() <= 1.0
    assert out.attention.min() >= 0.0 and out.attention.max() <= 1.0
    for tensor in (out.reconstruction, out.attention_logits, out.latent, out.latent_reconstructed):
        assert torch.isfinite(tensor).all()
    loss = out.reconstruction.mean() + out.attention_logits.mean() + (out.latent - out.latent_reconstructed).pow(2).mean()
    loss.backward()
    _assert_all_parameters_get_gradients(net)


@pytest.mark.parametrize("size, channels", [(32, 1), (64, 3)])
def test_repair_then_attend_shapes_finiteness_and_gradients(size, channels):
    torch.manual_seed(0)
    net = RepairThenAttend(RepairNet(channels, size, base_width=8, max_width=32),
                           AttentionNet(channels, size, base_width=8, max_width=32, condition_channels=channels))
    _open_gates(net)
    x = torch.rand(2, channels, size, size) * 2 - 1
    out = net(x)
    assert out.repaired.shape == x.shape and out.repaired.abs().max() <= 1.0
    assert out.attention_logits.shape == (2, 1, size, size)
    assert out.reconstruction is None and out.latent_reconstructed is None
    assert torch.isfinite(out.repaired).all() and torch.isfinite(out.attention_logits).all()
    (out.repaired.pow(2).mean() + out.attention_logits.mean()).backward()
    for module in (net.repair, net.attend.encoder, net.attend.decoder, net.attend.attention_head):
        _assert_all_parameters_get_gradients(module)


@pytest.mark.parametrize("detach", [False, True])
def test_the_attention_loss_reaches_the_repair_network_unless_detached(detach):
    torch.manual_seed(0)
    net = RepairThenAttend(RepairNet(1, 32, base_width=8, max_width=16),
                           AttentionNet(1, 32, base_width=8, max_width=16, condition_channels=1), detach_repair=detach)
    net(torch.rand(2, 1, 32, 32) * 2 - 1, reconstruct=False).attention_logits.mean().backward()
    reached = [p.grad is not None and p.grad.abs().sum() > 0 for p in net.repair.parameters()]
    assert (not any(reached)) if detach else all(reached)


def test_repair_then_attend_refuses_mismatched_parts_and_a_missing_condition():
    with pytest.raises(ValueError, match="condition_channels 0"):
        RepairThenAttend(RepairNet(1, 32), AttentionNet(1, 32))
    with pytest.raises(ValueError, match="image sizes differ"):
        RepairThenAttend(RepairNet(1, 64), AttentionNet(1, 32, condition_channels=1))
    with pytest.raises(ValueError, match="expected a condition"):
        AttentionNet(1, 32, condition_channels=1)(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="image_size must be a power of two >= 32, got 48"):
        RepairNet(1, 48)


def test_ensemble_averages_member_logits_and_every_attention_parameter_learns():
    torch.manual_seed(0)
    members = [AttentionNet(1, 32, base_width=8, max_width=16) for _ in range(3)]
    for member in members:
        _open_gates(member)
    ensemble = AttentionNetEnsemble(members)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    out = ensemble(x)
    singles = [member(x, reconstruct=False).attention_logits for member in members]
    assert out.member_attention_logits.shape == (3, 2, 1, 32, 32)
    torch.testing.assert_close(out.attention_logits, torch.stack(singles).mean(dim=0))
    assert out.latent.shape == (2, 3 * 16, 4, 4) and out.reconstruction is None and out.latent_reconstructed is None
    assert not torch.allclose(singles[0], singles[1])  # each member drew its own initial weights
    out.member_attention_logits.mean().backward()
    frozen = {id(p) for module in ensemble.reconstruction_modules() for p in module.parameters()}
    for name, parameter in ensemble.named_parameters():
        if id(parameter) not in frozen:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_ensemble_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        AttentionNetEnsemble([AttentionNet(1, 32, base_width=8, max_width=16)])
    with pytest.raises(ValueError, match=r"share channels and image size, got \[\(1, 32\), \(1, 64\)\]"):
        AttentionNetEnsemble([AttentionNet(1, 32, base_width=8, max_width=16), AttentionNet(1, 64, base_width=8, max_width=16)])
    ensemble = AttentionNetEnsemble([AttentionNet(1, 32, base_width=8, max_width=16) for _ in range(2)])
    with pytest.raises(ValueError, match="no reconstruction"):
        ensemble(torch.zeros(1, 1, 32, 32), reconstruct=True)


def test_self_attention_is_used_only_at_small_resolutions():
    net = AttentionNet(1, 128, base_width=4, max_width=16, attention_max_tokens=256)
    attention_sides = [m.query.in_channels for m in net.modules() if isinstance(m, SelfAttention2d)]
    assert len(attention_sides) == 2  # 8×8 and 16×16 decoder levels, not 32×32 or 64×64


@pytest.mark.parametrize("size", [32, 128, 512])
def test_every_supported_size_builds(size):
    net = AttentionNet(1, size, base_width=4, max_width=8, attention_max_tokens=64)
    assert net.encoder.blocks[-1].conv.out_channels == 8
    if size <= 128:
        with torch.no_grad():
            assert net(torch.zeros(1, 1, size, size)).attention_logits.shape[-1] == size


@pytest.mark.parametrize("size", [16, 48, 100, 1024])
def test_unsupported_sizes_are_refused_with_the_value(size):
    with pytest.raises(ValueError, match=f"got {size}"):
        AttentionNet(1, size)


def test_wrong_input_shape_is_refused():
    net = AttentionNet(1, 32, base_width=4, max_width=8)
    with pytest.raises(ValueError, match=r"expected input B×1×32×32, got \(1, 3, 32, 32\)"):
        net(torch.zeros(1, 3, 32, 32))


def test_discriminator_shapes_and_gradients():
    torch.manual_seed(0)
    disc = ImageMapDiscriminator(3, 64, base_width=8, max_width=32)
    logits, features = disc(torch.randn(2, 3, 64, 64), torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 1, 4, 4) and features.shape == (2, 32, 4, 4)
    (logits.mean() + features.mean()).backward()
    _assert_all_parameters_get_gradients(disc)


def test_cbam_and_self_attention_keep_shape_and_start_as_identity():
    x = torch.randn(2, 16, 8, 8)
    assert CBAM(16)(x).shape == x.shape
    attention = SelfAttention2d(16)
    assert torch.equal(attention(x), x)  # γ = 0 at initialisation
    with pytest.raises(ValueError, match="channels \\(4\\) must be >= key_ratio \\(8\\)"):
        SelfAttention2d(4)


def test_self_attention_matches_sagan_computed_position_by_position():
    torch.manual_seed(0)
    attention = SelfAttention2d(16)
    with torch.no_grad():
        attention.gamma.fill_(0.7)
    x = torch.randn(2, 16, 3, 5)
    q, k, v = (layer(x).flatten(2) for layer in (attention.query, attention.key, attention.value))
    expected = torch.empty_like(v)
    for i in range(15):  # SAGAN: o_i = Σ_j softmax_j(q_i · k_j) v_j, logits unscaled
        weights = torch.softmax(torch.einsum("bc,bcn->bn", q[:, :, i], k), dim=-1)
        expected[:, :, i] = torch.einsum("bn,bcn->bc", weights, v)
    expected = x + 0.7 * expected.reshape(x.shape)
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("conv_first", [False, True])
def test_up_block_computes_its_documented_order_whatever_the_layout(conv_first, channels_last):
    torch.manual_seed(0)
    block = UpBlock(4, 3, conv_first=conv_first).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        for p in block.norm.parameters():  # non-trivial affine norm
            p.uniform_(0.5, 1.5)

    def up(t):
        return F.interpolate(t, scale_factor=2.0, mode="bilinear", align_corners=False)

    def rest(t):
        return block.act(block.norm(block.conv(t)))

    expected = up(rest(x)) if conv_first else rest(up(x))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = block(x)
    assert got.shape == (2, 3, 12, 12)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"padding": 3}, {"stride": 2, "padding": 1, "bias": False}, {"dilation": 2, "padding": 2},
                                    {"padding": "same"}])
@pytest.mark.parametrize("channels_last", [False, True])
def test_single_channel_conv_equals_the_plain_conv_values_and_gradients(kwargs, channels_last):
    torch.manual_seed(0)
    fast = SingleChannelConv2d(5, 7, **kwargs)
    plain = torch.nn.Conv2d(5, 1, 7, **kwargs)
    plain.load_state_dict(fast.state_dict())  # same parameters, same keys
    x = torch.randn(3, 5, 20, 18)
    if channels_last:  # the stages' layout: weights and activations channels-last
        x = x.contiguous(memory_format=torch.channels_last)
        fast, plain = (m.to(memory_format=torch.channels_last) for m in (fast, plain))
    x_fast, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, out_plain = fast(x_fast), plain(x_plain)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_plain)
    out_fast.backward(grad)
    out_plain.backward(grad)
    torch.testing.assert_close(x_fast.grad, x_plain.grad, rtol=1e-5, atol=1e-5)
    for (name, p_fast), p_plain in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_fast.grad, p_plain.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_single_channel_conv_keeps_float64_and_rounds_bf16_once():
    torch.manual_seed(0)
    fast = SingleChannelConv2d(6, 3, padding=1).double()
    plain = torch.nn.Conv2d(6, 1, 3, padding=1).double()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-12, atol=1e-12)  # no detour through float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = fast.float()(x.float()), plain.float()(x.float())
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_affine_instance_norm_is_instance_norm_with_the_same_parameters(channels_last):
    """Same maths as ``nn.InstanceNorm2d(c, affine=True)`` in either layout, the same state-dict keys
    both ways (old checkpoints load strictly), per image (a batch-mate changes nothing)."""
    torch.manual_seed(0)
    ours = AffineInstanceNorm2d(6).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    plain = torch.nn.InstanceNorm2d(6, affine=True).double()
    plain.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(3, 6, 9, 7, dtype=torch.float64) * 4 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x[:1]), ours(x)[:1], rtol=1e-10, atol=1e-10)
    half = x.float().bfloat16()  # bf16 activations (autocast) take the instance-norm kernel
    got, expected = ours.float()(half), plain.float()(half)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_features must be an integer >= 1, got 0"):
        AffineInstanceNorm2d(0)


def test_affine_instance_norm_takes_the_instance_norm_kernel_under_bf16_autocast(monkeypatch):
    """After a conv, float32 activations go through the group-norm kernel; under bf16 autocast the
    conv's bf16 output goes through the instance-norm kernel (the faster one there)."""
    calls = []
    group_norm, instance_norm = F.group_norm, F.instance_norm
    monkeypatch.setattr(F, "group_norm", lambda *a, **k: calls.append("group") or group_norm(*a, **k))
    monkeypatch.setattr(F, "instance_norm", lambda *a, **k: calls.append("instance") or instance_norm(*a, **k))
    block = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), AffineInstanceNorm2d(4))
    x = torch.randn(2, 2, 8, 8)
    assert block(x).dtype == torch.float32 and calls == ["group"]
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x).dtype == torch.bfloat16
    assert calls == ["instance"]


def test_networks_use_the_affine_instance_norm_only():
    for net in (AttentionNet(1, 32), GANomaly2D(1), PatchDiscriminator(1)):
        kinds = {type(m) for m in net.modules()}
        assert torch.nn.InstanceNorm2d not in kinds
    assert any(isinstance(m, AffineInstanceNorm2d) for m in AttentionNet(1, 32).modules())


def test_single_channel_conv_refuses_what_its_depthwise_form_cannot_compute():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        SingleChannelConv2d(4, 3, padding=1, padding_mode="reflect")


def test_ganomaly2d_grey_decoder_ends_in_the_single_channel_conv():
    assert isinstance(GANomaly2D(1).decoder.layers[-2], SingleChannelConv2d)
    assert type(GANomaly2D(3).decoder.layers[-2]) is torch.nn.Conv2d


def test_pooled_self_attention_attends_to_max_pooled_keys_and_values():
    torch.manual_seed(0)
    attention = SelfAttention2d(16, kv_pool=2)
    with torch.no_grad():
        attention.gamma.fill_(0.7)
    x = torch.randn(2, 16, 4, 6)
    q = attention.query(x).flatten(2)
    k = F.max_pool2d(attention.key(x), 2).flatten(2)  # 2×3 = 6 pooled positions
    v = F.max_pool2d(attention.value(x), 2).flatten(2)
    expected = torch.empty(2, 16, 24)
    for i in range(24):
        weights = torch.softmax(torch.einsum("bc,bcn->bn", q[:, :, i], k), dim=-1)
        expected[:, :, i] = torch.einsum("bn,bcn->bc", weights, v)
    torch.testing.assert_close(attention(x), x + 0.7 * expected.reshape(x.shape), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kv_pool must be a power of two >= 1, got 3"):
        SelfAttention2d(16, kv_pool=3)


@pytest.mark.parametrize("side, kv_max, pool", [(32, None, 1), (32, 1024, 1), (32, 256, 2), (32, 64, 4), (16, 256, 1), (4, 1, 4)])
def test_kv_pool_leaves_at_most_the_asked_number_of_keys(side, kv_max, pool):
    assert kv_pool_for(side, kv_max) == pool


def test_fast_stage1_options_build_train_and_keep_shapes():
    torch.manual_seed(0)
    net = AttentionNet(1, 64, base_width=8, max_width=32, attention_max_tokens=1024, attention_kv_max_tokens=64,
                       final_up="conv_upsample")
    pools = [a.kv_pool for a in net.decoder.attentions if isinstance(a, SelfAttention2d)]
    assert pools == [1, 2, 4]  # 8×8 whole; 16×16 and 32×32 pooled to 8×8 = 64 keys
    assert net.decoder.final_up.conv_first
    _open_gates(net)
    x = torch.randn(2, 1, 64, 64)
    out = net(x)
    assert out.attention_logits.shape == (2, 1, 64, 64) and torch.isfinite(out.attention_logits).all()
    (out.attention_logits.mean() + out.reconstruction.mean() + out.latent_reconstructed.mean()).backward()
    _assert_all_parameters_get_gradients(net)
    with pytest.raises(ValueError, match="final_up must be 'upsample_conv' or 'conv_upsample', got 'bicubic'"):
        AttentionNet(1, 64, final_up="bicubic")


def test_separate_reconstruction_decoder_gets_gradients_and_skips_the_skips():
    torch.manual_seed(0)
    net = AttentionNet(1, 32, base_width=8, max_width=32, separate_reconstruction=True)
    _open_gates(net)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    out = net(x)
    assert out.reconstruction.shape == x.shape
    (out.reconstruction.mean() + out.attention_logits.mean() + out.latent_reconstructed.mean()).backward()
    _assert_all_parameters_get_gradients(net)
    # x̂ is computed from the bottleneck z alone (no skip reaches it)
    with torch.no_grad():
        features = net.encoder(x)
        assert torch.equal(net.reconstruction_head(net.reconstruction_decoder(features[-1])), out.reconstruction.detach())


# --------------------------------------------------------------------------------------------
# stage 2: GANomaly2D


@pytest.mark.parametrize("channels, height, width", [(1, 32, 32), (3, 64, 48)])
def test_ganomaly2d_shapes_finiteness_and_gradients(channels, height, width):
    torch.manual_seed(0)
    net = GANomaly2D(channels, width_divisor=16)
    x = torch.rand(2, channels, height, width) * 2 - 1
    out = net(x)
    assert out.reconstruction.shape == x.shape and out.reconstruction.abs().max() <= 1.0
    assert out.latent.shape == out.latent_reconstructed.shape == (2, 64, height // 16, width // 16)
    assert out.score_map.shape == (2, 1, height // 16, width // 16) and (out.score_map >= 0).all()
    for tensor in (out.reconstruction, out.latent, out.latent_reconstructed):
        assert torch.isfinite(tensor).all()
    (out.reconstruction.mean() + out.score_map.mean()).backward()
    _assert_all_parameters_get_gradients(net)


def test_ganomaly2d_widths_follow_the_divisor():
    assert patch_widths(1) == [64, 128, 256, 512, 1024]  # GANomaly2D's widths
    assert patch_widths(4) == [16, 32, 64, 128, 256]
    net = GANomaly2D(1, width_divisor=8)
    assert net.encoder.layers[1].out_channels == 8 and net(torch.zeros(1, 1, 32, 32)).latent.shape[1] == 128


@pytest.mark.parametrize("divisor", [0, 3, 128])
def test_ganomaly2d_bad_divisor_is_refused_with_the_value(divisor):
    with pytest.raises(ValueError, match=f"divisor of 64.*got {divisor}"):
        GANomaly2D(1, width_divisor=divisor)


def test_ganomaly2d_refuses_sizes_that_are_not_multiples_of_16():
    with pytest.raises(ValueError, match=r"multiples of 16, got \(1, 1, 40, 32\)"):
        GANomaly2D(1, width_divisor=16)(torch.zeros(1, 1, 40, 32))


def test_patch_discriminator_is_a_70px_patchgan_with_logits():
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, width_divisor=8)
    logits = disc(torch.randn(2, 3, 128, 96))
    assert logits.shape == (2, 1, 14, 10)  # (H/8 − 2) × (W/8 − 2) patches
    assert (logits < 0).any() and (logits > 0).any()  # raw logits, no sigmoid
    logits.mean().backward()
    _assert_all_parameters_get_gradients(disc)
    with pytest.raises(ValueError, match="at least 32×32"):
        disc(torch.zeros(1, 3, 16, 16))


# stage 2: the defect head beside GANomaly2D


@pytest.mark.parametrize("channels, height, width", [(1, 32, 32), (3, 64, 48)])
def test_headed_ganomaly2d_shapes_finiteness_and_gradients(channels, height, width):
    torch.manual_seed(0)
    net = GANomaly2DWithHead(channels, width_divisor=16, head_width=4)
    x = torch.rand(2, channels, height, width) * 2 - 1
    out = net(x)
    cells = (2, 1, height // HEAD_CELL, width // HEAD_CELL)
    assert out.reconstruction.shape == x.shape and out.defect_logits.shape == cells
    assert out.latent.shape == (2, 64, height // 16, width // 16)
    assert net.cell_size == HEAD_CELL
    assert out.score_map.shape == cells and (out.score_map >= 0).all()
    for tensor in (out.reconstruction, out.defect_logits, out.score_map):
        assert torch.isfinite(tensor).all()
    (out.reconstruction.mean() + (out.latent - out.latent_reconstructed).pow(2).mean() + out.defect_logits.mean()).backward()
    _assert_all_parameters_get_gradients(net)


def test_the_head_loss_stops_at_the_reconstruction():
    torch.manual_seed(0)
    net = GANomaly2DWithHead(1, width_divisor=16, head_width=4)
    net(torch.rand(2, 1, 32, 32)).defect_logits.mean().backward()
    assert all(p.grad is None for p in net.generator.parameters())
    assert all(p.grad is not None for p in net.head.parameters())


def test_head_score_map_is_softplus_of_the_logits_a_cell_mask_takes_any_defect_pixel():
    torch.manual_seed(0)
    out = GANomaly2DWithHead(1, width_divisor=16, head_width=4)(torch.rand(1, 1, 32, 32))
    torch.testing.assert_close(out.score_map, torch.log1p(out.defect_logits.exp()))
    mask = torch.ones(1, 1, 8, 8)
    mask[0, 0, 5, 2] = 0  # one defect pixel in cell (1, 0)
    expected = torch.ones(1, 1, 2, 2)
    expected[0, 0, 1, 0] = 0
    torch.testing.assert_close(cell_mask(mask), expected)


def test_defect_head_refuses_bad_arguments_and_inputs_with_the_value():
    with pytest.raises(ValueError, match="in_channels must be 1 or 3, got 2"):
        DefectHead(2)
    with pytest.raises(ValueError, match="base_width must be a positive integer, got 0"):
        DefectHead(1, base_width=0)
    with pytest.raises(ValueError, match="depth must be an integer from 1 to 4, got 5"):
        DefectHead(1, depth=5)
    with pytest.raises(ValueError, match=r"multiples of 16, got \(1, 1, 40, 32\)"):
        DefectHead(1, base_width=4)(torch.zeros(1, 1, 40, 32), torch.zeros(1, 1, 40, 32))
    with pytest.raises(ValueError, match="n_down must be at least 3.*got 2"):
        GANomaly2DWithHead(1, n_down=2)
