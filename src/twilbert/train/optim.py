"""Optimizers and learning-rate schedules: LAMB, parameter groups, Noam annealing.

TWilBert offers ``adam``/``adam_accumulated``, ``lamb``/``lamb_accumulated`` and any framework
optimizer by name; accumulation lives in the training loop, so the ``*_accumulated`` names are
plain aliases here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from twilbert.config import OPTIMIZERS

ParamGroups = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019): Adam direction plus decoupled weight decay, rescaled per tensor
    by the trust ratio ||w|| / ||update|| (1 when either norm is 0).

    A group with ``layer_adaptation=False`` skips the trust ratio (plain AdamW step): as in
    BERT's LAMB, biases and norm weights are excluded, since a step proportional to ||w||
    can never carry a scalar across zero. All tensors of a param group share one device.
    """

    def __init__(
        self,
        params: ParamGroups,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        layer_adaptation: bool = True,
    ):
        if lr <= 0.0:
            raise ValueError(f"Lamb: lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"Lamb: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, layer_adaptation=layer_adaptation)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]

        # Adam moments
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        # bias-corrected direction m_hat / (sqrt(v_hat) + eps), plus decoupled weight decay
        denom = torch._foreach_div(exp_avg_sqs, [1.0 - beta2**t for t in steps])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(exp_avgs, [1.0 - beta1**t for t in steps])
        torch._foreach_div_(updates, denom)
        if group["weight_decay"] != 0.0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])

        if not group["layer_adaptation"]:
            torch._foreach_add_(params, updates, alpha=-group["lr"])
            return

        # layer-wise trust ratio, one scalar per tensor
        w_norms, u_norms = torch._foreach_norm(params), torch._foreach_norm(updates)
        dtype = functools.reduce(torch.promote_types, (n.dtype for n in w_norms), torch.float32)
        w_norm = torch.stack([n.to(dtype) for n in w_norms])  # (P,)
        u_norm = torch.stack([n.to(dtype) for n in u_norms])  # (P,)
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm.clamp_min(1e-30), 1.0)
        scale = (trust * -group["lr"]).unbind()
        torch._foreach_mul_(updates, [s.to(u.dtype) for s, u in zip(scale, updates)])
        torch._foreach_add_(params, updates)


def noam_lr(step: int, hidden_size: int, warmup_steps: int, scale: float = 1.0) -> float:
    """Noam schedule: scale * H^-0.5 * min(t^-0.5, t * warmup^-1.5), t = optimizer step (>= 1)."""
    t = max(int(step), 1)
    return scale * hidden_size**-0.5 * min(t**-0.5, t * warmup_steps**-1.5)


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, value_lr: Optional[float] = None
) -> list[dict[str, Any]]:
    """Split trainable parameters as BERT does: decay on matrices, none on biases and norm weights.

    With ``value_lr`` set, product-key-memory value tables (names ending in ``values.weight``)
    form their own group at that rate and without decay, as XLM trains them.
    Groups are named (``decay``, ``no_decay``, ``pkm_values``); empty groups are dropped.
    Only ``decay`` keeps LAMB's layer adaptation (``layer_adaptation``, ignored by other optimizers).
    """
    decay, no_decay, values = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if value_lr is not None and name.endswith("values.weight"):
            values.append(p)
        elif name.endswith("bias") or p.ndim < 2:  # biases, LayerNorm/BatchNorm weights
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay, "layer_adaptation": True},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0, "layer_adaptation": False},
        {"name": "pkm_values", "params": values, "lr": value_lr, "weight_decay": 0.0, "layer_adaptation": False},
    ]
    return [g for g in groups if g["params"]]


def _torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    return {
        name.lower(): obj
        for name, obj in vars(torch.optim).items()
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    }


def _materialize(group: Any) -> Any:
    """A dict group with its params as a list (generators would be consumed by inspection)."""
    if not isinstance(group, dict):
        return group
    params = group["params"]
    return {**group, "params": [params] if isinstance(params, torch.Tensor) else list(params)}


def build_optimizer(name: str, groups: ParamGroups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Optimizer by TWilBert name (adam, adam_accumulated, lamb, lamb_accumulated) or any
    ``torch.optim`` class name, case-insensitive. ``adam`` is AdamW (decoupled decay)."""
    groups = [_materialize(g) for g in groups]
    key = name.lower()
    if key in ("adam", "adam_accumulated"):
        tensors = [t for g in groups for t in (g["params"] if isinstance(g, dict) else [g])]
        # The fused kernel (CUDA, and CPU since torch 2.4) needs every tensor on one such device
        # type and floating point; foreach is the fast path elsewhere.
        types = {t.device.type for t in tensors}
        fusable = bool(tensors) and len(types) == 1 and types <= {"cpu", "cuda"} and all(
            t.is_floating_point() for t in tensors
        )
        kind = {"fused": True} if fusable else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kind)
    if key in ("lamb", "lamb_accumulated"):
        return Lamb(groups, lr=lr, weight_decay=weight_decay)
    classes = _torch_optimizers()
    if key not in classes:
        choices = list(dict.fromkeys([*OPTIMIZERS, *sorted(classes)]))
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(choices)}")
    cls = classes[key]
    accepted = inspect.signature(cls).parameters
    kwargs = {"lr": lr, "weight_decay": weight_decay}
    return cls(groups, **{k: v for k, v in kwargs.items() if k in accepted})


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    noam: bool,
    hidden_size: int,
    warmup_steps: int,
    base_lr: Optional[float] = None,
) -> LambdaLR:
    """Per-optimizer-step schedule; call ``scheduler.step()`` after each ``optimizer.step()``.

    With ``noam`` on, the lr of a group at optimizer step t (1-based) is
    ``noam_lr(t, hidden_size, warmup_steps) * group_lr / base_lr``, where ``group_lr`` is the
    group's lr when the scheduler is built and ``base_lr`` defaults to the optimizer's
    constructor lr (the config ``lr``): the main groups follow Noam exactly and a group at a
    different rate (PKM values) keeps its ratio to them. With ``noam`` off the lr is constant.
    """
    if not noam:
        return LambdaLR(optimizer, lambda _: 1.0)
    base = optimizer.defaults["lr"] if base_lr is None else base_lr
    if not base or base <= 0:
        raise ValueError(f"build_scheduler: base_lr must be > 0, got {base}")

    def multiplier(last_epoch: int) -> float:
        # LambdaLR passes 0 before the first optimizer step, so step t uses last_epoch t - 1
        return noam_lr(last_epoch + 1, hidden_size, warmup_steps) / base

    return LambdaLR(optimizer, multiplier)
