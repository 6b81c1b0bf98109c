"""Gradient-norm weights on a two-layer toy whose gradients are known in closed form.

f = P_f x (the "feature"), eps = P_o f (the "output"). For L = mean((eps - y)^2) over n entries:
dL/dP_o = g f^T and dL/dP_f = (P_o^T g) x^T with g = 2 (eps - y) / n, so every norm the spec
uses is a product of vector norms that the test writes out by hand.
"""

import pytest
import torch

from moebius.train import LossConfig, distill_losses
from moebius.train import weighting as W

X = torch.tensor([1.0, 2.0])


def _toy(p_f, p_o, noise, eps_teacher, feature_teacher, cfg, perceptual=None):
    p_f = torch.nn.Parameter(torch.as_tensor(p_f, dtype=torch.float64))
    p_o = torch.nn.Parameter(torch.as_tensor(p_o, dtype=torch.float64))
    x = X.double()
    f = p_f @ x  # (2,)
    eps = p_o @ f  # (2,)
    as4d = lambda t: t.reshape(1, 2, 1, 1)  # noqa: E731 - the losses take [B, C, H, W]
    total, logs = distill_losses(
        cfg,
        eps_student=as4d(eps),
        noise=as4d(torch.as_tensor(noise, dtype=torch.float64)),
        student_features=[as4d(f)],
        eps_teacher=as4d(torch.as_tensor(eps_teacher, dtype=torch.float64)),
        teacher_features=[as4d(torch.as_tensor(feature_teacher, dtype=torch.float64))],
        feature_param=p_f,
        output_param=p_o,
        x_t=as4d(eps.detach()),
        alpha_bar_t=torch.tensor([0.5], dtype=torch.float64),
        perceptual=perceptual,
    )
    return total, logs, (p_f, p_o, f.detach(), eps.detach())


def _by_hand(p_o, f, eps, target):
    """(|dL/dP_o|, |dL/dP_f|) of L = mean((eps - target)^2), written out."""
    g = 2 * (eps - torch.as_tensor(target, dtype=torch.float64)) / 2
    return float(g.norm() * f.norm()), float((p_o.detach().T @ g).norm() * X.double().norm())


CFG = LossConfig(perceptual=False, feature_pairs=((0, 0),), log_all_norms=True)
P_F = [[0.5, -0.2], [0.1, 0.3]]
P_O = [[1.0, 0.4], [-0.3, 0.8]]


def test_weights_and_total_follow_the_spec_formula():
    noise, eps_t, feat_t = [0.3, -0.1], [0.05, 0.2], [0.2, 0.4]
    total, logs, (p_f, p_o, f, eps) = _toy(P_F, P_O, noise, eps_t, feat_t, CFG)
    out_task, feat_task = _by_hand(p_o, f, eps, noise)
    out_kd, feat_kd_via_out = _by_hand(p_o, f, eps, eps_t)
    g_feat = 2 * (f - torch.tensor(feat_t, dtype=torch.float64)) / 2
    feat_kd = float(g_feat.norm() * X.double().norm())  # dL_featKD/dP_f = g_feat x^T
    expected_norms = {
        "out_gnorm_task": out_task,
        "out_gnorm_output_kd": out_kd,
        "feat_gnorm_task": feat_task,
        "feat_gnorm_output_kd": feat_kd_via_out,
        "feat_gnorm_feature_kd": feat_kd,
    }
    for key, value in expected_norms.items():
        assert float(logs[key]) == pytest.approx(value, rel=1e-12), key
    w_out = out_task / (out_kd + 1e-6)
    w_feat = feat_kd / (feat_task + 1e-4)
    assert float(logs["weight_output_kd"]) == pytest.approx(w_out, rel=1e-12)
    assert float(logs["weight_feature"]) == pytest.approx(w_feat, rel=1e-12)
    l_task, l_out, l_feat = (
        float(logs[k]) for k in ("loss_task", "loss_output_kd", "loss_feature_kd")
    )
    expected = 0.01 * l_feat + w_feat * (0.5 * l_task + 0.01 * w_out * l_out)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-12)


def test_weights_are_detached_constants_in_the_total():
    noise, eps_t, feat_t = [0.3, -0.1], [0.05, 0.2], [0.2, 0.4]
    total, logs, (p_f, p_o, f, eps) = _toy(P_F, P_O, noise, eps_t, feat_t, CFG)
    assert not logs["weight_feature"].requires_grad and not logs["weight_output_kd"].requires_grad
    total.backward()
    # d total / d P_o = w_feat (0.5 g_task + 0.01 w_out g_out) f^T: no term through the weights.
    g_task = eps - torch.tensor(noise, dtype=torch.float64)
    g_out = eps - torch.tensor(eps_t, dtype=torch.float64)
    w_out, w_feat = float(logs["weight_output_kd"]), float(logs["weight_feature"])
    expected = w_feat * torch.outer(0.5 * g_task + 0.01 * w_out * g_out, f)
    torch.testing.assert_close(p_o.grad, expected, rtol=1e-12, atol=1e-15)


def test_output_weight_clamps_at_1e6():
    # Student eps equals the teacher's: zero output-KD gradient, ratio |task| / 1e-6 is huge.
    eps = torch.tensor(P_O, dtype=torch.float64) @ (
        torch.tensor(P_F, dtype=torch.float64) @ X.double()
    )
    _, logs, _ = _toy(P_F, P_O, [30.0, -10.0], eps.tolist(), [0.2, 0.4], CFG)
    assert float(logs["out_gnorm_output_kd"]) == 0.0
    assert float(logs["out_gnorm_task"]) > 1.0  # so |task| / 1e-6 > 1e6
    assert float(logs["weight_output_kd"]) == W.OUTPUT_MAX == 1e6


def test_feature_weight_clamps_at_1e4():
    # Student eps equals the noise: zero task gradient at P_f, ratio |featKD| / 1e-4 > 1e4.
    eps = torch.tensor(P_O, dtype=torch.float64) @ (
        torch.tensor(P_F, dtype=torch.float64) @ X.double()
    )
    _, logs, _ = _toy(P_F, P_O, eps.tolist(), [0.05, 0.2], [20.0, 40.0], CFG)
    assert float(logs["feat_gnorm_task"]) == 0.0 and float(logs["feat_gnorm_feature_kd"]) > 1.0
    assert float(logs["weight_feature"]) == W.FEATURE_MAX == 1e4
    # ...and the output weight is 0 when the task gradient vanishes (clamped below at 0).
    assert float(logs["weight_output_kd"]) == 0.0


def test_clamp_edges_by_hand():
    one = torch.tensor(1.0)
    assert float(W.output_weight(one, torch.tensor(0.0))) == 1e6
    assert float(W.output_weight(2 * one, one)) == pytest.approx(2 / (1 + 1e-6))
    assert float(W.feature_weight(one, torch.tensor(0.0))) == 1e4
    assert float(W.feature_weight(one, 3 * one)) == pytest.approx(1 / (3 + 1e-4))
    assert float(W.feature_weight(torch.tensor(0.0), one)) == 0.0


def test_perceptual_weight_uses_the_output_layer():
    # A perceptual metric on x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); abar = 0.5 -> x0 =
    # sqrt(2) x_t - eps, so d metric / d eps = -d metric / d x0 and |dL_lp/dP_o| is by hand too.
    noise, eps_t, feat_t = [0.3, -0.1], [0.05, 0.2], [0.2, 0.4]
    cfg = CFG.replace(perceptual=True)
    metric = lambda a, b: ((a - b) ** 2).sum(dim=(1, 2, 3))  # noqa: E731
    total, logs, (p_f, p_o, f, eps) = _toy(P_F, P_O, noise, eps_t, feat_t, cfg, metric)
    # x0_S - x0_T = -(eps - noise) (x_t cancels): L_lp = |eps - noise|^2, g = 2 (eps - noise).
    g = 2 * (eps - torch.tensor(noise, dtype=torch.float64))
    out_lp = float(g.norm() * f.norm())
    assert float(logs["loss_perceptual"]) == pytest.approx(float((g / 2).square().sum()), rel=1e-12)
    assert float(logs["out_gnorm_perceptual"]) == pytest.approx(out_lp, rel=1e-12)
    w_lp = float(logs["out_gnorm_task"]) / (out_lp + 1e-6)
    assert float(logs["weight_perceptual"]) == pytest.approx(w_lp, rel=1e-12)


def test_fixed_weights_skip_the_norms():
    noise, eps_t, feat_t = [0.3, -0.1], [0.05, 0.2], [0.2, 0.4]
    cfg = LossConfig(perceptual=False, feature_pairs=((0, 0),), adaptive=False)
    total, logs, _ = _toy(P_F, P_O, noise, eps_t, feat_t, cfg)
    assert all(logs[k] is None for k in logs if "gnorm" in k)
    assert float(logs["weight_output_kd"]) == float(logs["weight_feature"]) == 1.0
    l_task, l_out, l_feat = (
        float(logs[k]) for k in ("loss_task", "loss_output_kd", "loss_feature_kd")
    )
    expected = 0.01 * l_feat + 0.5 * l_task + 0.01 * l_out
    assert float(total.detach()) == pytest.approx(expected, rel=1e-12)


def test_without_the_task_term_the_ratios_fall_back_to_static_weights():
    noise, eps_t, feat_t = [0.3, -0.1], [0.05, 0.2], [0.2, 0.4]
    cfg = LossConfig(task=False, perceptual=False, feature_pairs=((0, 0),))
    total, logs, _ = _toy(P_F, P_O, noise, eps_t, feat_t, cfg)
    assert logs["loss_task"] is None
    assert float(logs["weight_output_kd"]) == float(logs["weight_feature"]) == 1.0
    l_out, l_feat = float(logs["loss_output_kd"]), float(logs["loss_feature_kd"])
    assert float(total.detach()) == pytest.approx(0.01 * l_feat + 0.01 * l_out, rel=1e-12)


def test_batched_norms_equal_one_backward_per_cotangent():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))  # train mode
    x = torch.randn(2, 3, 5, 5)
    out = layer(x)
    cotangents = [torch.randn_like(out) for _ in range(3)]
    batched = W.vjp_norms(out, layer[0].weight, cotangents)
    for v, norm in zip(cotangents, batched, strict=True):
        (g,) = torch.autograd.grad(out, layer[0].weight, v, retain_graph=True)
        assert float(norm) == pytest.approx(float(g.norm()), rel=1e-5)
