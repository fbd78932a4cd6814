"""The warmup-stable-decay (WSD) learning-rate schedule, and decay branches from a stable run.

`--lr-schedule wsd`: a linear warmup to the peak (the optimizer's lr, `--lr`), then the peak held
constant, then a decay of `--lr-wsd-decay-iters` steps to `--min-lr`, shaped linear, cosine or
1 - sqrt (`--lr-wsd-decay-style`), starting at step `--lr-decay-start` (default: so that the
decay ends at `--train-iters`). Update t (0-based) uses

    warmup   t < W:           peak * (t + 1) / W
    stable   W <= t < S:      peak
    decay    S <= t < S + D:  min + (peak - min) * f((t - S) / D),   f(x) = 1 - x | (1 + cos(pi x)) / 2 | 1 - sqrt(x)
    after    t >= S + D:      min

The rate is a pure function of the step and the flags; the schedule's state is only the number
of updates done (saved in every checkpoint by DeepSpeed), so a restart continues exactly. A decay
branch is a resume of a stable-phase checkpoint with other flags: `--load MAIN --save BRANCH
--lr-decay-start S --train-iters S+D` decays from step S in its own folder while the main run,
with its own flags, keeps the peak. The default (`--lr-schedule deepspeed`) leaves the
DeepSpeed JSON's scheduler in charge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sctd_dist.flags import flag

_SCHEDULE = "schedule"
DECAY_STYLES = ("linear", "cosine", "minus_sqrt")


@dataclass
class LRScheduleConfig:
    """Which learning-rate schedule a run follows (flags named as in Megatron-LM)."""

    lr_schedule: str = flag("deepspeed", "deepspeed: the DeepSpeed JSON's scheduler (sized by "
                            "--train-iters / --lr-decay-iters); wsd: warmup, constant, decay",
                            choices=("deepspeed", "wsd"), group=_SCHEDULE)
    lr_warmup_iters: int | None = flag(None, "wsd: warmup steps (default: the JSON's warmup_num_steps, "
                                       "else 1%% of --train-iters); pin it for decay branches",
                                       group=_SCHEDULE)
    lr_decay_start: int | None = flag(None, "wsd: the step the decay begins (default: --train-iters "
                                      "minus --lr-wsd-decay-iters)", group=_SCHEDULE)
    lr_wsd_decay_iters: int | None = flag(None, "wsd: length of the decay in steps (default: 10%% of "
                                          "--train-iters)", group=_SCHEDULE)
    lr_wsd_decay_style: str = flag("linear", "wsd: shape of the decay", choices=DECAY_STYLES,
                                   group=_SCHEDULE)
    min_lr: float = flag(0.0, "wsd: the rate the decay ends at", group=_SCHEDULE)

    def __post_init__(self) -> None:
        for name in ("lr_warmup_iters", "lr_wsd_decay_iters"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.lr_decay_start is not None and self.lr_decay_start < 0:
            raise ValueError(f"--lr-decay-start must be >= 0, got {self.lr_decay_start}")
        if self.min_lr < 0:
            raise ValueError(f"--min-lr must be >= 0, got {self.min_lr}")
        if self.lr_schedule != "wsd":
            given = [n for n in ("lr_warmup_iters", "lr_decay_start", "lr_wsd_decay_iters")
                     if getattr(self, n) is not None]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} belongs to the WSD schedule; add "
                                 "--lr-schedule wsd (the DeepSpeed scheduler takes --lr-decay-iters)")

    def resolve(self, train_iters: int, peak: float, json_warmup: int | None = None) -> "WSD":
        """The schedule of a run of `train_iters` steps peaking at `peak`; ValueError naming the
        flag when the phases do not fit together."""
        decay = self.lr_wsd_decay_iters or max(1, round(0.1 * train_iters))
        start = self.lr_decay_start if self.lr_decay_start is not None else max(0, train_iters - decay)
        warmup = self.lr_warmup_iters or json_warmup or max(1, round(0.01 * train_iters))
        if warmup > start:
            raise ValueError(f"--lr-warmup-iters {warmup} ends after the decay starts (step {start}); "
                             "lower it or move --lr-decay-start later")
        if self.min_lr > peak:
            raise ValueError(f"--min-lr {self.min_lr:g} is above the peak lr {peak:g}; lower it")
        return WSD(peak, self.min_lr, warmup, start, decay, self.lr_wsd_decay_style)


@dataclass(frozen=True)
class WSD:
    """The rate of each update under warmup-stable-decay (see the module docstring)."""

    peak: float
    min_lr: float
    warmup: int
    decay_start: int
    decay_iters: int
    style: str = "linear"

    def lr(self, step: int) -> float:
        """The learning rate of update `step` (0-based)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if step < self.decay_start:
            return self.peak
        x = min(1.0, (step - self.decay_start) / self.decay_iters)
        shape = {"linear": 1.0 - x, "cosine": 0.5 * (1.0 + math.cos(math.pi * x)),
                 "minus_sqrt": 1.0 - math.sqrt(x)}[self.style]
        return self.min_lr + (self.peak - self.min_lr) * shape

    def describe(self) -> dict[str, Any]:
        return {"schedule": "wsd", "peak": self.peak, "min_lr": self.min_lr, "warmup": self.warmup,
                "decay_start": self.decay_start, "decay_iters": self.decay_iters, "style": self.style}


class WSDScheduler:
    """DeepSpeed's scheduler protocol (`step`, `get_lr`, `get_last_lr`, `state_dict`,
    `load_state_dict`) over a `WSD` formula; the state is the index of the last update done."""

    def __init__(self, optimizer: Any, schedule: WSD, last_batch_iteration: int = -1):
        self.optimizer = optimizer
        self.schedule = schedule
        self.last_batch_iteration = last_batch_iteration
        self._apply()

    def get_lr(self) -> list[float]:
        """The rate of the next update, per parameter group."""
        return [self.schedule.lr(self.last_batch_iteration + 1)] * len(self.optimizer.param_groups)

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Called by DeepSpeed after every optimizer update."""
        self.last_batch_iteration = (self.last_batch_iteration + 1 if last_batch_iteration is None
                                     else int(last_batch_iteration))
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_batch_iteration = int(state["last_batch_iteration"])
        self._apply()
