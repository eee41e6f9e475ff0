"""Learning-rate schedules: warmup, linear / cosine / wsd / constant, cooldown, final_lr_fraction."""

import math

import pytest

from surogate.cli.config import Config
from surogate.cli.schedule import lr_at


def _lrs(steps=100, **kw):
    cfg = Config(learning_rate=1.0, **kw)
    return [lr_at(s, cfg, steps) for s in range(steps)]


def test_warmup_is_linear_from_zero():
    lrs = _lrs(lr_scheduler_type="constant", warmup_steps=10)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert set(lrs[10:]) == {1.0}
    assert _lrs(lr_scheduler_type="constant", warmup_ratio=0.2)[19] == pytest.approx(1.0)
    assert _lrs(lr_scheduler_type="constant", warmup_ratio=0.2)[18] == pytest.approx(19 / 20)


def test_linear_and_cosine_decay_to_the_final_fraction():
    lin = _lrs(lr_scheduler_type="linear", warmup_steps=10, final_lr_fraction=0.1)
    assert lin[10] == pytest.approx(1.0) and lin[55] == pytest.approx(1.0 - 0.9 * 45 / 90)
    assert lin[-1] == pytest.approx(1.0 - 0.9 * 89 / 90)
    cos = _lrs(lr_scheduler_type="cosine", warmup_steps=10, final_lr_fraction=0.1)
    assert cos[10] == pytest.approx(1.0)
    assert cos[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(cos[10:-1], cos[11:], strict=True))  # monotone after warmup


def test_wsd_holds_then_cools_down_as_one_minus_sqrt():
    lrs = _lrs(lr_scheduler_type="wsd", warmup_steps=10, cooldown_steps=20, final_lr_fraction=0.0)
    assert set(lrs[10:80]) == {1.0}
    for i, s in enumerate(range(80, 100)):
        assert lrs[s] == pytest.approx(1.0 - math.sqrt((i + 1) / 20))
    assert lrs[-1] == pytest.approx(0.0)


def test_cooldown_after_linear_decay_ends_at_final():
    lrs = _lrs(lr_scheduler_type="linear", cooldown_steps=10, final_lr_fraction=0.5)
    assert lrs[89] == pytest.approx(1.0 - 0.5 * 89 / 90) and lrs[-1] == pytest.approx(0.5)
