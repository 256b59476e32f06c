import numpy as np
import torch

from fastenc.engine.optim import param_groups
from fastenc.engine.schedules import PrecomputedLR, warmup_cosine


def test_warmup_cosine_shape_and_endpoints():
    t = warmup_cosine(1.0, 100, 10, final=0.1)
    assert len(t) == 100
    assert t[0] == 0.0 and np.all(np.diff(t[:11]) > 0)
    assert abs(t[10] - 1.0) < 1e-12
    assert np.all(np.diff(t[10:]) <= 1e-12)
    assert 0.1 <= t[-1] < 0.11


def test_precomputed_lr_follows_table_and_resumes():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    table = warmup_cosine(1.0, 20, 5)
    sched = PrecomputedLR(opt, table)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert np.allclose(seen, table[:8])
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([p], lr=1.0)
    sched2 = PrecomputedLR(opt2, table)
    sched2.load_state_dict(state)
    sched2.step(), sched.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_no_decay_groups():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    m.register_parameter("emb", torch.nn.Parameter(torch.zeros(5, 4)))
    groups = param_groups(m, 0.1, {"emb"})
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(m[0].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4
