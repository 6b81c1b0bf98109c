"""distill_losses on the tiny student: every switch combination runs, off terms are None."""

import itertools

import pytest
import torch

from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.train import LossConfig, distill_losses, logs_to_floats, weighting_params
from moebius.train.step import LOG_KEYS


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    student = MoebiusUNet(MoebiusConfig.tiny()).train()
    g = torch.Generator().manual_seed(1)
    s = student.config.sample_size
    batch = dict(
        sample=torch.randn(2, 9, s, s, generator=g),
        timesteps=torch.tensor([137, 811]),
        input_ids=torch.stack([torch.arange(10), torch.arange(10, 20)]),
        noise=torch.randn(2, 4, s, s, generator=g),
        eps_teacher=torch.randn(2, 4, s, s, generator=g),
    )
    return student, batch


def _run(student, batch, cfg, perceptual=None):
    student.zero_grad(set_to_none=True)
    eps, feats = student(
        batch["sample"], batch["timesteps"], batch["input_ids"], return_features=True
    )
    teacher_feats = [torch.randn_like(f) for f in feats]
    teacher_feats[5] = torch.randn_like(feats[2])  # the pair (2, 5) compares equal shapes
    p_f, p_o = weighting_params(student)
    abar = torch.tensor([0.9, 0.2])
    return distill_losses(
        cfg,
        eps_student=eps,
        noise=batch["noise"],
        student_features=feats,
        eps_teacher=batch["eps_teacher"] if cfg.output_kd else None,
        teacher_features=teacher_feats if cfg.feature_kd else None,
        feature_param=p_f,
        output_param=p_o,
        x_t=batch["sample"][:, :4],
        alpha_bar_t=abar,
        perceptual=perceptual,
    )


def l1_metric(a, b):  # a stand-in perceptual metric: per-sample mean |a - b|
    return (a - b).abs().mean(dim=(1, 2, 3))


@pytest.mark.parametrize(
    "task, output_kd, feature_kd, perceptual",
    [c for c in itertools.product([True, False], repeat=4) if any(c)],
)
def test_any_term_can_be_switched_off(tiny, task, output_kd, feature_kd, perceptual):
    student, batch = tiny
    cfg = LossConfig(
        task=task, output_kd=output_kd, feature_kd=feature_kd, perceptual=perceptual,
        log_all_norms=True,
    )  # fmt: skip
    total, logs = _run(student, batch, cfg, perceptual=l1_metric if perceptual else None)
    assert set(logs) == set(LOG_KEYS)
    on = {"task": task, "output_kd": output_kd, "feature_kd": feature_kd, "perceptual": perceptual}
    for term, is_on in on.items():
        assert (logs[f"loss_{term}"] is None) == (not is_on)
    assert (logs["weight_output_kd"] is None) == (not output_kd)
    assert (logs["weight_perceptual"] is None) == (not perceptual)
    assert (logs["weight_feature"] is None) == (not feature_kd)
    # log_all_norms: every norm of an active term is there, none of an inactive one.
    assert (logs["feat_gnorm_feature_kd"] is None) == (not feature_kd)
    for term in ("task", "output_kd", "perceptual"):
        assert (logs[f"out_gnorm_{term}"] is None) == (not on[term])
        assert (logs[f"feat_gnorm_{term}"] is None) == (not (on[term] and feature_kd))
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    floats = logs_to_floats(logs)
    assert floats["loss"] == pytest.approx(float(total.detach()))


def test_adaptive_weights_under_gradient_checkpointing_change_nothing(tiny):
    """The weighting backpropagates through the up path twice (norm, then the total): the loop's
    checkpointed blocks recompute twice and must give the same numbers and BatchNorm statistics."""
    from moebius.train.networks import enable_gradient_checkpointing

    _, batch = tiny
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        student = MoebiusUNet(MoebiusConfig.tiny()).train()
        if checkpointing:
            enable_gradient_checkpointing(student)
        total, logs = _run(student, batch, LossConfig(perceptual=False, log_all_norms=True))
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters()])
        stats = torch.cat([b.flatten().double() for b in student.buffers()])
        results.append((logs_to_floats(logs), grads, stats))
    (logs_a, grads_a, stats_a), (logs_b, grads_b, stats_b) = results
    assert logs_a == logs_b
    torch.testing.assert_close(grads_a, grads_b, rtol=0, atol=1e-7)
    assert torch.equal(stats_a, stats_b)
