import math

import pytest

from sparsify.training.schedule import lr_factor


def test_linear_decay_reaches_min_lr_factor_on_the_last_step():
    factors = [lr_factor(s, 10, "linear", min_lr_factor=0.1) for s in range(10)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert factors[5] == pytest.approx(1 - 0.9 * 5 / 9)


def test_cosine_with_warmup_hand_computed():
    # warm-up 2 steps: 1/2, 2/2; then 8 decay steps with t = 0, 1/7, ..., 1
    factors = [lr_factor(s, 10, "cosine", warmup_steps=2, min_lr_factor=0.1) for s in range(10)]
    assert factors[:2] == pytest.approx([0.5, 1.0])
    assert factors[2] == pytest.approx(1.0)
    assert factors[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 7)))
    assert factors[-1] == pytest.approx(0.1)


def test_cooldown_scales_the_tail_linearly():
    # constant schedule, 10 steps, cooldown 4: factors 1 ... 1, 4/4, 3/4, 2/4, 1/4
    factors = [lr_factor(s, 10, "constant", cooldown_steps=4) for s in range(10)]
    assert factors == pytest.approx([1.0] * 6 + [1.0, 0.75, 0.5, 0.25])
