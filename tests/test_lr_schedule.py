"""The warmup-stable-decay schedule: its formula, its state, its flags and where it replaces the
DeepSpeed JSON's scheduler. (Training runs that follow it and restart exactly:
tests/training/test_mixture_runs.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from sctd_dist.arguments import parse_args
from sctd_dist.ds_config import apply_lr_schedule, load_ds_config, validate_with_deepspeed
from sctd_dist.lr_schedule import WSD, LRScheduleConfig, WSDScheduler

PEAK, MIN = 1e-3, 1e-5


@pytest.mark.parametrize("style,shape", [("linear", lambda x: 1 - x),
                                         ("cosine", lambda x: (1 + math.cos(math.pi * x)) / 2),
                                         ("minus_sqrt", lambda x: 1 - math.sqrt(x))])
def test_rate_of_every_step_is_the_formula(style, shape) -> None:
    wsd = WSD(PEAK, MIN, warmup=10, decay_start=50, decay_iters=20, style=style)
    for t in range(100):
        if t < 10:
            want = PEAK * (t + 1) / 10
        elif t < 50:
            want = PEAK
        elif t < 70:
            want = MIN + (PEAK - MIN) * shape((t - 50) / 20)
        else:
            want = MIN
        assert wsd.lr(t) == pytest.approx(want, rel=1e-12, abs=1e-15), t
    assert wsd.lr(9) == PEAK and wsd.lr(50) == PEAK and wsd.lr(70) == MIN


def test_scheduler_state_restarts_exactly_and_branches_decay_from_the_stable_phase() -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=PEAK)
    main = WSDScheduler(opt, WSD(PEAK, 0.0, 5, 1000, 10))
    assert opt.param_groups[0]["lr"] == PEAK / 5  # update 0's rate is set before it runs
    for _ in range(30):
        main.step()
    state = main.state_dict()
    resumed = WSDScheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=PEAK),
                           WSD(PEAK, 0.0, 5, 1000, 10))
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == main.get_last_lr() == [PEAK]
    branch_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=PEAK)
    branch = WSDScheduler(branch_opt, WSD(PEAK, 0.0, 5, 30, 10))
    branch.load_state_dict(state)  # a stable-phase checkpoint of the main run
    rates = []
    for _ in range(12):
        rates.append(branch_opt.param_groups[0]["lr"])
        branch.step()
        main.step()
    assert rates[0] == PEAK and rates[5] == pytest.approx(PEAK / 2) and rates[10:] == [0.0, 0.0]
    assert main.get_last_lr() == [PEAK]


def test_flags_and_the_deepspeed_json(capsys) -> None:
    cfg = parse_args(["--lr-schedule", "wsd", "--lr-wsd-decay-iters", "30", "--train-iters", "200",
                      "--lr", "2e-4", "--min-lr", "1e-6", "--lr-wsd-decay-style", "cosine"])
    ds, wsd = apply_lr_schedule(load_ds_config("ds_configs/cpu_tiny.json"), cfg.schedule, cfg.train_iters)
    assert "scheduler" not in ds and ds["optimizer"]["params"]["lr"] == 5e-4  # peak from the JSON here
    validate_with_deepspeed(ds)
    assert (wsd.warmup, wsd.decay_start, wsd.decay_iters, wsd.style, wsd.min_lr) == (2, 170, 30, "cosine", 1e-6)
    ds, none = apply_lr_schedule(load_ds_config("ds_configs/cpu_tiny.json"), LRScheduleConfig(), 200)
    assert none is None and ds["scheduler"]["params"]["total_num_steps"] == 200  # the default path
    for argv, message in ((["--lr-decay-start", "5"], "--lr-decay-start belongs to the WSD schedule"),
                          (["--lr-schedule", "wsd", "--lr-wsd-decay-iters", "0"], "--lr-wsd-decay-iters must be >= 1"),
                          (["--lr-schedule", "wsd", "--min-lr=-1"], "--min-lr must be >= 0")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="--lr-warmup-iters 50 ends after the decay starts"):
        LRScheduleConfig("wsd", lr_warmup_iters=50, lr_decay_start=40).resolve(100, PEAK)
    with pytest.raises(ValueError, match="--min-lr 0.01 is above the peak"):
        LRScheduleConfig("wsd", min_lr=0.01).resolve(100, PEAK)
