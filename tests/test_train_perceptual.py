"""E-LatentLPIPS: a randomly initialised metric saved in the released layout loads and scores."""

import logging

import pytest
import torch

from moebius.train import LossConfig, distill_losses
from moebius.train.perceptual import ELatentLPIPS, load_perceptual, resolve_perceptual


def _released_layout(metric: ELatentLPIPS) -> dict:
    """The state dict as the elatentlpips package saves it: heads under lin{k} AND lins.{k}."""
    state = metric.state_dict()
    state.update({f"lins.{k}.model.1.weight": state[f"lin{k}.model.1.weight"] for k in range(5)})
    return state


@pytest.fixture(scope="module")
def random_metric():
    torch.manual_seed(0)
    metric = ELatentLPIPS(ensembling=False)
    for m in metric.modules():  # non-trivial BatchNorm statistics and positive heads
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    for k in range(5):
        getattr(metric, f"lin{k}").model[1].weight.data.uniform_(0, 0.1)
    return metric


def test_key_layout_is_the_released_one(random_metric):
    state = random_metric.state_dict()
    assert state["net.slice1.0.weight"].shape == (64, 4, 3, 3)  # 4 latent channels in
    assert state["net.slice5.40.weight"].shape == (512, 512, 3, 3)  # last conv, torchvision index
    assert state["lin4.model.1.weight"].shape == (1, 512, 1, 1)
    assert sum(k.endswith("running_var") for k in state) == 13  # 13 conv + BN pairs
    pools = [m for m in random_metric.net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 2  # the first three of five are removed


def test_weights_file_loads_strictly_through_the_released_path(random_metric, tmp_path):
    path = tmp_path / "sdxl_latest_vgg16_tuned.pth"
    torch.save(_released_layout(random_metric), path)
    loaded = load_perceptual(path, ensembling=False)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    expected = random_metric(a, b)
    torch.testing.assert_close(loaded(a, b), expected, rtol=1e-6, atol=0)
    assert expected.shape == (2,) and (expected > (a - b).abs().mean(dim=(1, 2, 3))).all()
    assert torch.equal(loaded(a, a), torch.zeros(2))
    bad = _released_layout(random_metric)
    bad.pop("net.slice3.14.weight")
    torch.save(bad, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_perceptual(path)


def test_ensembling_augments_both_inputs_alike_and_is_differentiable(random_metric):
    metric = ELatentLPIPS(ensembling=True, generator=torch.Generator().manual_seed(5))
    metric.load_state_dict(random_metric.state_dict())
    a = torch.randn(2, 4, 16, 16, requires_grad=True)
    assert torch.allclose(metric(a, a.detach()), torch.zeros(2), atol=1e-6)  # same warp
    d = metric(a, torch.zeros(2, 4, 16, 16))
    d.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is None for p in metric.parameters())  # the metric itself is frozen
    replay = ELatentLPIPS(ensembling=True, generator=torch.Generator().manual_seed(5))
    replay.load_state_dict(random_metric.state_dict())
    replay(a, a.detach())
    torch.testing.assert_close(replay(a, torch.zeros(2, 4, 16, 16)), d)  # explicit generator


def test_original_scaling_multiplies_again():
    metric = ELatentLPIPS(ensembling=False, original_scaling=True)
    a, b = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    plain = ELatentLPIPS(ensembling=False)
    plain.load_state_dict(metric.state_dict())
    torch.testing.assert_close(metric(a, b), plain(0.13025 * a, 0.13025 * b))


def test_without_weights_the_term_is_off_and_the_run_says_so(caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        cfg, metric = resolve_perceptual(LossConfig())
    assert metric is None and not cfg.perceptual
    assert "perceptual (E-LatentLPIPS) term is OFF" in caplog.text
    with pytest.raises(FileNotFoundError, match="Mingguksky/elatentlpips"):
        resolve_perceptual(LossConfig(perceptual_weights=str(tmp_path / "missing.pth")))


def test_the_loaded_metric_drives_the_perceptual_weight(random_metric, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_released_layout(random_metric), path)
    cfg, metric = resolve_perceptual(
        LossConfig(output_kd=False, feature_kd=False, perceptual_weights=str(path))
    )
    assert cfg.perceptual and isinstance(metric, ELatentLPIPS)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 1)  # stands in for the network's output layer P_o
    x_t = torch.randn(2, 4, 16, 16)
    eps = conv(x_t)
    total, logs = distill_losses(
        cfg,
        eps_student=eps,
        noise=torch.randn(2, 4, 16, 16),
        feature_param=conv.weight,
        output_param=conv.weight,
        x_t=x_t,
        alpha_bar_t=torch.tensor([0.5, 0.9]),
        perceptual=metric,
    )
    w = float(logs["out_gnorm_task"]) / (float(logs["out_gnorm_perceptual"]) + 1e-6)
    assert float(logs["weight_perceptual"]) == pytest.approx(w, rel=1e-6)
    assert float(logs["loss_perceptual"]) > 0
    total.backward()
    assert conv.weight.grad.abs().sum() > 0
