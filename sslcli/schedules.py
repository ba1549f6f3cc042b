"""Schedules precomputed as arrays, one value per iteration (or per epoch where said).

DINO's `cosine_scheduler`: optional linear warm-up from `warmup_start` to `base` over
`warmup_iters`, then cosine from `base` to `final` over the remaining iterations.
SimSiam's `adjust_learning_rate` (optim.schedule_unit: epoch): one value per epoch,
base * 0.5 * (1 + cos(pi * e / epochs)), held for the epoch's iterations.
"""

from __future__ import annotations

import math


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> list[float]:
    """Per-iteration values, length epochs * steps_per_epoch."""
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs * steps_per_epoch, total)
    values = [warmup_start + (base - warmup_start) * i / warmup for i in range(warmup)]
    rest = total - warmup
    for i in range(rest):
        values.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / rest)))
    return values


def epoch_cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                          warmup_epochs: int = 0, warmup_start: float = 0.0) -> list[float]:
    """Per-iteration values (length epochs * steps_per_epoch), constant within each epoch.

    Epoch e >= warmup: final + 0.5 * (base - final) * (1 + cos(pi * (e - warmup) / (epochs - warmup))),
    which for warmup = 0 and final = 0 is SimSiam's lr_e = base * 0.5 * (1 + cos(pi * e / epochs))
    (the last epoch stays above `final`, as in the authors' code). Epochs e < warmup (not used by
    SimSiam): linear warmup_start + (base - warmup_start) * e / warmup, the per-epoch analogue of
    cosine_schedule's warm-up.
    """
    warmup = min(warmup_epochs, epochs)
    per_epoch = [warmup_start + (base - warmup_start) * e / warmup for e in range(warmup)]
    rest = epochs - warmup
    per_epoch += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * e / rest)) for e in range(rest)]
    return [v for v in per_epoch for _ in range(steps_per_epoch)]


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int,
                                 epochs: int) -> list[float]:
    """Per-epoch teacher temperature: linear warm-up (numpy.linspace inclusive), then constant."""
    if warmup_epochs <= 0:
        return [temp] * epochs
    if warmup_epochs == 1:
        ramp = [warmup_temp]
    else:
        ramp = [warmup_temp + (temp - warmup_temp) * i / (warmup_epochs - 1) for i in range(warmup_epochs)]
    return ramp + [temp] * (epochs - warmup_epochs)
