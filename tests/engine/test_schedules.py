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
    decay = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {id(m[0].weight)}
    assert no_decay == {id(m[0].bias), id(m[1].weight), id(m[1].bias), id(m.emb)}


def test_groups_keep_every_flattened_parameter_aligned():
    """DeepSpeed flattens each group in order: every parameter's offset is then a multiple of ALIGN_ELEMS."""
    from fastenc.engine.optim import ALIGN_ELEMS

    sizes = [1, 768, 3, 2304, 5, 768 * 768, 7, 16]
    m = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(n)) for n in sizes])
    groups = param_groups(m, 0.1)
    assert sorted(p.numel() for g in groups for p in g["params"]) == sorted(sizes)
    for g in groups:
        offsets = [sum(p.numel() for p in g["params"][:i]) for i in range(len(g["params"]))]
        assert all(o % ALIGN_ELEMS == 0 for o in offsets), (g["name"], offsets)
        assert g["weight_decay"] == 0.0  # 1-D: no decay, in every split group
    assert len(groups) == 4  # the aligned ones + one ragged, then one group per further ragged parameter
