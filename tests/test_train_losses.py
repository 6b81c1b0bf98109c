"""The loss terms as pure functions: values by hand, offset noise, x0 conversion, bad input."""

import math

import pytest
import torch

from moebius.train import LossConfig
from moebius.train import losses as L


def test_offset_noise_is_randn_plus_a_per_channel_shift_from_the_generator():
    noise = L.offset_noise((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 8, 8, generator=g)
    shift = torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(noise, base + 0.0357 * shift, rtol=0, atol=0)
    again = L.offset_noise((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise, again)  # explicit generator: reproducible
    plain = L.offset_noise((1, 1, 2, 2), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0)))


def test_task_and_output_kd_are_plain_means():
    eps = torch.tensor([[[[1.0, 2.0]]]])
    noise = torch.tensor([[[[0.0, 4.0]]]])
    assert float(L.task_loss(eps, noise)) == pytest.approx((1 + 4) / 2)
    teacher = torch.tensor([[[[1.5, 2.0]]]], requires_grad=True)
    loss = L.output_kd_loss(eps.requires_grad_(), teacher)
    assert float(loss.detach()) == pytest.approx(0.25 / 2)
    loss.backward()
    assert teacher.grad is None  # the frozen teacher gets no gradient
    bf16 = L.task_loss(eps.detach().bfloat16(), noise.bfloat16())
    assert bf16.dtype == torch.float32  # computed in fp32 under autocast outputs


def test_feature_kd_sums_weighted_pairs():
    s = [torch.zeros(1, 2, 2, 2), torch.ones(1, 3, 1, 1)]
    t = [torch.full((1, 3, 1, 1), 3.0), torch.ones(1, 2, 2, 2)]
    loss = L.feature_kd_loss(s, t, [(0, 1), (1, 0)], [1.0, 0.5])
    assert float(loss) == pytest.approx(1.0 * 1.0 + 0.5 * 4.0)
    with pytest.raises(ValueError, match="same shape"):
        L.feature_kd_loss(s, t, [(0, 0)], [1.0])
    with pytest.raises(IndexError, match="out of range"):
        L.feature_kd_loss(s, t, [(2, 0)], [1.0])
    with pytest.raises(ValueError, match="one weight per"):
        L.feature_kd_loss(s, t, [(0, 1)], [1.0, 2.0])


def test_x0_from_eps_inverts_ddpm_noising():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    abar = torch.tensor(
        [0.99915, 0.27633, 0.00466]
    )  # t = 0, 500, 999 of the scaled-linear schedule
    x_t = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(L.x0_from_eps(x_t, eps, abar), x0, rtol=0, atol=2e-4)
    with pytest.raises(ValueError, match="one value per sample"):
        L.x0_from_eps(x_t, eps, abar[:2])


def test_perceptual_loss_compares_x0_of_student_and_of_true_noise():
    g = torch.Generator().manual_seed(1)
    x_t, eps, noise = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    abar = torch.tensor([0.25, 0.64])
    seen = {}

    def metric(a, b):
        seen["a"], seen["b"] = a, b
        return (a - b).abs().mean(dim=(1, 2, 3))

    loss = L.perceptual_loss(metric, x_t, eps, noise, abar)
    # x0_S - x0_T = -sqrt(1 - abar) / sqrt(abar) (eps - noise): sqrt(3) and 0.75 here.
    scale = torch.tensor([math.sqrt(0.75 / 0.25), math.sqrt(0.36 / 0.64)]).view(-1, 1, 1, 1)
    expected = (scale * (eps - noise)).abs().mean(dim=(1, 2, 3)).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(seen["b"], L.x0_from_eps(x_t, noise, abar))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(task=False, output_kd=False, feature_kd=False, perceptual=False), "every loss"),
        (dict(feature_pairs=((2, 5), (1, 4)), feature_weights=(1.0,)), "equal length"),
        (dict(kd_weight=-1.0), "kd_weight"),
        (dict(task_weight=float("nan")), "task_weight"),
    ],
)
def test_loss_config_refuses_bad_settings(changes, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**changes)


def test_loss_config_defaults_are_the_original_recipe():
    cfg = LossConfig(feature_pairs=[[2, 5]], feature_weights=[1])  # JSON gives lists
    assert cfg == LossConfig()
    assert (cfg.task_weight, cfg.kd_weight, cfg.perceptual_weight) == (0.5, 0.01, 0.5)
    assert cfg.feature_pairs == ((2, 5),) and cfg.adaptive and cfg.needs_teacher
    assert not cfg.replace(output_kd=False, feature_kd=False).needs_teacher
