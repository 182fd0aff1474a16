"""lowrank.train.schedule: the learning-rate schedules against transformers' own."""

import pytest
import torch

from lowrank.train.schedule import lr_at


@pytest.mark.parametrize("schedule,min_lr", [("constant", 0.0), ("linear", 0.0), ("linear", 3e-5), ("cosine", 0.0),
                                             ("cosine", 3e-5)])
def test_lr_schedules_match_transformers(schedule, min_lr):
    from transformers import optimization as hf

    lr, total, warmup = 3e-4, 37, 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    make = {
        "constant": lambda: hf.get_constant_schedule_with_warmup(opt, warmup),
        "linear": lambda: hf.get_polynomial_decay_schedule_with_warmup(opt, warmup, total, lr_end=min_lr, power=1.0),
        "cosine": lambda: hf.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr=min_lr),
    }
    reference = make[schedule]()
    for step in range(total):
        expected = reference.get_last_lr()[0]
        got = lr_at(step, total, lr, schedule, warmup, min_lr)
        if step < warmup:
            # transformers' warmup starts at lr 0 (a step that trains nothing); lowrank's at lr / (warmup + 1).
            assert got == pytest.approx(lr * (step + 1) / (warmup + 1), rel=1e-12)
        else:
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-15), step
        opt.step()
        reference.step()
