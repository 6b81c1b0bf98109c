"""EMA of the trainable weights: LitEma's warm-up decay, state round trip, copy_to."""

import pytest
import torch

from moebius.train import EMA


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model[1].bias.requires_grad_(False)  # frozen: not averaged
    return model


def test_update_follows_the_litema_formula():
    model = _model()
    ema = EMA(model, decay=0.9999)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)  # n = 1: d = min(0.9999, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow["0.weight"], d * start + (1 - d) * (start + 1))
    assert ema.num_updates == 1
    assert ema.current_decay() == pytest.approx(3 / 12)
    for _ in range(100_000):  # the warm-up term passes 0.9999 after ~90k updates
        ema.num_updates += 1
    assert ema.current_decay() == 0.9999


def test_state_dict_round_trip_and_copy_to():
    model = _model()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3)
    ema.update(model)
    other = EMA(_model(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates == 1
    target = _model()
    other.copy_to(target)
    torch.testing.assert_close(target[0].weight, ema.shadow["0.weight"])
    assert not torch.equal(target[0].weight, model[0].weight)
    torch.testing.assert_close(target[1].running_var, model[1].running_var)  # buffers untouched


def test_mismatched_models_are_refused():
    ema = EMA(_model())
    with pytest.raises(KeyError, match="different trainable"):
        ema.update(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="decay"):
        EMA(_model(), decay=1.5)
