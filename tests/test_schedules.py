"""EMA and learning-rate schedules."""
import math

import pytest

from d2v.core.config import EMAConfig, OptimConfig
from d2v.objective import ema_decay
from d2v.runtime.schedule import lr_at


def test_ema_linear_then_held():
    cfg = EMAConfig(decay=0.999, end_decay=0.9999, anneal_steps=1000)
    assert ema_decay(cfg, 0) == pytest.approx(0.999)
    assert ema_decay(cfg, 500) == pytest.approx(0.99945)
    assert ema_decay(cfg, 1000) == pytest.approx(0.9999)
    assert ema_decay(cfg, 10**6) == pytest.approx(0.9999)


def test_ema_constant():
    cfg = EMAConfig(decay=0.9998, end_decay=0.9998, anneal_steps=0)
    assert ema_decay(cfg, 0) == ema_decay(cfg, 12345) == 0.9998


def test_cosine_warmup():
    cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_fraction=0.1, final_lr_ratio=0.0)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising through warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # falling after
    assert lrs[55] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] < 1e-5


def test_tri_stage():
    cfg = OptimConfig(lr=5e-4, schedule="tri_stage", warmup_fraction=0.03, hold_fraction=0.9, final_lr_ratio=0.05)
    total = 1000
    assert lr_at(cfg, 0, total) == pytest.approx(5e-4 * (0.01 + 0.99 / 30))
    assert lr_at(cfg, 29, total) == pytest.approx(5e-4)
    assert lr_at(cfg, 500, total) == pytest.approx(5e-4)
    assert lr_at(cfg, 999, total) == pytest.approx(5e-4 * 0.05, rel=0.15)
