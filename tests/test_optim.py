"""LAMB, Noam schedule, parameter groups and optimizer selection."""

import math

import pytest
import torch
from torch import nn

from twilbert.train.optim import Lamb, build_optimizer, build_scheduler, noam_lr, param_groups

LR, BETAS, EPS, WD = 0.1, (0.9, 0.999), 1e-6, 0.01


def _lamb_reference(w, g, steps):
    """Plain-Python LAMB on one tensor (list of floats) with a constant gradient."""
    m, v = [0.0] * len(w), [0.0] * len(w)
    for t in range(1, steps + 1):
        m = [BETAS[0] * mi + (1 - BETAS[0]) * gi for mi, gi in zip(m, g)]
        v = [BETAS[1] * vi + (1 - BETAS[1]) * gi * gi for vi, gi in zip(v, g)]
        m_hat = [mi / (1 - BETAS[0] ** t) for mi in m]
        v_hat = [vi / (1 - BETAS[1] ** t) for vi in v]
        u = [mh / (math.sqrt(vh) + EPS) + WD * wi for mh, vh, wi in zip(m_hat, v_hat, w)]
        w_norm, u_norm = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in u))
        trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        w = [wi - LR * trust * ui for wi, ui in zip(w, u)]
    return w


def _toy_lamb(steps):
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = Lamb([w, b], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for _ in range(steps):
        w.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
        b.grad = torch.tensor([2.0], dtype=torch.float64)
        opt.step()
    return w.detach(), b.detach()


def test_lamb_first_step_matches_hand_computed_values():
    w, b = _toy_lamb(1)
    # m_hat = g, v_hat = g^2 -> u = g/(|g|+eps) + wd*w = [1.029998, -0.959999]; trust = 5/||u|| = 3.55111
    assert w.tolist() == pytest.approx([2.6342364285644306, 4.3409061598309675], rel=1e-12)
    # ||b|| = 0 -> trust ratio 1: b = -lr * 2/(2+eps)
    assert b.tolist() == pytest.approx([-0.099999950000025], rel=1e-12)


def test_lamb_second_step_matches_reference():
    w, b = _toy_lamb(2)
    assert w.tolist() == pytest.approx(_lamb_reference([3.0, 4.0], [0.5, -1.0], 2), rel=1e-12)
    assert b.tolist() == pytest.approx(_lamb_reference([0.0], [2.0], 2), rel=1e-12)
    # step 2 of b has a non-zero weight: trust = 0.1 / |u|, a step of exactly lr * ||b|| = 0.01
    assert b.item() == pytest.approx(-0.1 - 0.01, rel=1e-6)


def test_lamb_trust_ratio_is_one_for_zero_weights():
    w = nn.Parameter(torch.zeros(3))
    opt = Lamb([w], lr=0.5, eps=0.0, weight_decay=0.1)
    w.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    assert w.tolist() == pytest.approx([-0.5, 0.5, -0.5])  # -lr * sign(g), no rescaling


def test_lamb_trust_ratio_is_one_for_zero_update():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = Lamb([w], lr=0.5, weight_decay=0.0)
    w.grad = torch.zeros(2)
    opt.step()
    assert w.tolist() == [1.0, 2.0]


def test_lamb_without_layer_adaptation_takes_the_plain_adamw_step():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = Lamb([{"params": [w], "layer_adaptation": False}], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    w.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
    opt.step()
    # w - lr * u with u = [1.029998, -0.959999], no trust ratio
    assert w.tolist() == pytest.approx([2.8970002, 4.0959999], rel=1e-7)


def test_lamb_steps_a_group_of_mixed_dtypes():
    a = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    b = nn.Parameter(torch.ones(2, dtype=torch.float32))
    opt = Lamb([a, b], lr=0.1)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert a.dtype == torch.bfloat16
    assert a.float().tolist() == pytest.approx([0.9] * 3, rel=1e-2)
    assert b.tolist() == pytest.approx([0.9] * 2, rel=1e-5)


def test_lamb_resumes_from_state_dict_exactly():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = Lamb([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    p.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
    opt.step()
    saved = opt.state_dict()
    q = nn.Parameter(p.detach().clone())
    resumed = Lamb([q], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    resumed.load_state_dict(saved)
    q.grad = p.grad.clone()
    resumed.step()
    assert q.tolist() == pytest.approx(_lamb_reference([3.0, 4.0], [0.5, -1.0], 2), rel=1e-12)


def test_lamb_skips_params_without_grad_and_honours_group_lr():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = Lamb([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    a.grad = torch.ones(2)
    opt.step()
    assert b.tolist() == [1.0, 1.0] and b not in opt.state
    # ||w|| = ||u|| direction (1, 1)/(1+eps): trust * u has the norm of w, so the step is lr * w
    assert a.tolist() == pytest.approx([0.9, 0.9], rel=1e-5)


@pytest.mark.parametrize(
    "step,expected",
    [(1, 5.04294706537424e-08), (4000, 2.0171788261496963e-04), (8000, 4.0343576522993926e-04),
     (16000, 2.85272165367274e-04)],
)
def test_noam_lr_matches_hand_computed_values(step, expected):
    # 768^-0.5 * min(t^-0.5, t * 8000^-1.5); the peak at t = warmup is 1/sqrt(768 * 8000)
    assert noam_lr(step, 768, 8000) == pytest.approx(expected, rel=1e-12)


def test_noam_lr_step_zero_is_step_one_and_scale_multiplies():
    assert noam_lr(0, 768, 8000) == noam_lr(1, 768, 8000)
    assert noam_lr(8000, 768, 8000, scale=2.0) == pytest.approx(2 / math.sqrt(768 * 8000))


def test_scheduler_reproduces_noam_per_optimizer_step():
    main, values = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    opt = build_optimizer("sgd", [{"params": [main]}, {"params": [values], "lr": 0.05}], lr=0.01, weight_decay=0.0)
    sched = build_scheduler(opt, noam=True, hidden_size=16, warmup_steps=4)
    for t in range(1, 10):
        assert opt.param_groups[0]["lr"] == pytest.approx(noam_lr(t, 16, 4), rel=1e-12)
        assert opt.param_groups[1]["lr"] == pytest.approx(5 * noam_lr(t, 16, 4), rel=1e-12)
        opt.step()
        sched.step()


def test_scheduler_without_noam_is_constant():
    p = nn.Parameter(torch.ones(2))
    opt = build_optimizer("adam", [p], lr=3e-4, weight_decay=0.0)
    sched = build_scheduler(opt, noam=False, hidden_size=16, warmup_steps=4)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 3e-4


class _Memory(nn.Module):
    def __init__(self):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(4, 2))
        self.values = nn.EmbeddingBag(8, 4, mode="sum")


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.memory = _Memory()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _names(model, group):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return sorted(by_id[id(p)] for p in group["params"])


def test_param_groups_separates_decay_no_decay_and_pkm_values():
    model = _Toy()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.01, value_lr=1e-2)}
    assert set(groups) == {"decay", "no_decay", "pkm_values"}
    assert _names(model, groups["decay"]) == ["dense.weight", "embeddings.weight", "memory.keys"]
    assert _names(model, groups["no_decay"]) == ["LayerNorm.bias", "LayerNorm.weight", "bn.bias", "bn.weight",
                                                 "dense.bias"]
    assert _names(model, groups["pkm_values"]) == ["memory.values.weight"]
    assert (groups["decay"]["weight_decay"], groups["decay"]["lr"]) == (0.01, 1e-3)
    assert (groups["no_decay"]["weight_decay"], groups["no_decay"]["lr"]) == (0.0, 1e-3)
    assert (groups["pkm_values"]["weight_decay"], groups["pkm_values"]["lr"]) == (0.0, 1e-2)
    assert [groups[k]["layer_adaptation"] for k in ("decay", "no_decay", "pkm_values")] == [True, False, False]


def test_param_groups_without_value_lr_keeps_values_with_decay():
    model = _Toy()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.01)}
    assert "pkm_values" not in groups
    assert "memory.values.weight" in _names(model, groups["decay"])


def test_param_groups_count_shared_parameters_once():
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, layer)  # cross-layer sharing
    groups = param_groups(model, lr=1e-3, weight_decay=0.01)
    assert sum(len(g["params"]) for g in groups) == 2


@pytest.mark.parametrize(
    "name,cls",
    [("adam", torch.optim.AdamW), ("adam_accumulated", torch.optim.AdamW), ("lamb", Lamb),
     ("LAMB_accumulated", Lamb), ("SGD", torch.optim.SGD), ("sgd", torch.optim.SGD),
     ("RMSprop", torch.optim.RMSprop), ("adagrad", torch.optim.Adagrad), ("NAdam", torch.optim.NAdam)],
)
def test_build_optimizer_by_name(name, cls):
    model = _Toy()
    opt = build_optimizer(name, param_groups(model, 0.02, 0.01), lr=0.02, weight_decay=0.01)
    assert type(opt) is cls
    assert opt.defaults["lr"] == 0.02
    if "weight_decay" in opt.defaults:
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_build_optimizer_accepts_generators_inside_groups():
    model = nn.Linear(2, 2)
    opt = build_optimizer("adam", [{"params": model.parameters()}], lr=1e-3, weight_decay=0.0)
    assert len(opt.param_groups[0]["params"]) == 2


def test_build_optimizer_adam_uses_the_fused_kernel_on_cpu():
    opt = build_optimizer("adam", [nn.Parameter(torch.ones(2))], lr=1e-3, weight_decay=0.0)
    assert opt.defaults["fused"] is True


def test_fused_adam_step_matches_the_reference_adamw():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5, 3))
    b.data.copy_(a.data)
    fused = build_optimizer("adam", [a], lr=1e-2, weight_decay=0.01)
    plain = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(3):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(a.data, b.data)


def test_build_optimizer_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamax2'.*adam_accumulated.*lamb.*sgd"):
        build_optimizer("adamax2", [nn.Parameter(torch.ones(2))], lr=1e-3, weight_decay=0.0)


def test_lamb_trains_a_tiny_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    opt = build_optimizer("lamb", param_groups(model, 0.05, 0.0), lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(200):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first
