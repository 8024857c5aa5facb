"""Optimizers and the learning-rate schedule.

The optimizer is built over whatever parameters a process holds; its state is per parameter,
so a layer's state can be exported with the layer and imported elsewhere (see
:func:`export_state` / :func:`import_state`). Element-wise optimizers (AdamW, Adam, SGD) give the
same update whichever process holds a parameter, which is what makes any plan equal to the
single-process reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter], object], torch.optim.Optimizer]


def _adamw(params: list[nn.Parameter], spec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay)


def _adam(params: list[nn.Parameter], spec) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay)


def _sgd(params: list[nn.Parameter], spec) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


#: Pluggable: add an entry to support another optimizer name.
OPTIMIZERS: dict[str, OptimizerFactory] = {"adamw": _adamw, "adam": _adam, "sgd": _sgd}


def make_optimizer(spec, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """``spec`` is an :class:`oobleck.common.jobspec.OptimizerSpec`."""
    try:
        factory = OPTIMIZERS[spec.name]
    except KeyError:
        raise ValueError(f"optimizer.name: must be one of {', '.join(OPTIMIZERS)}, got {spec.name!r}") from None
    params = list(params)
    if not params:
        # A process may hold no trainable parameter (it never happens with the built-in models,
        # but keep the optimizer valid): a dummy keeps torch.optim happy and is never stepped.
        params = [nn.Parameter(torch.zeros(1))]
    return factory(params, spec)


def lr_at(spec, step: int) -> float:
    """Learning rate for 0-based ``step``: linear warm-up over ``warmup_steps``, then constant."""
    if spec.warmup_steps > 0 and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    return spec.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def export_state(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """The optimizer state of one parameter as CPU tensors (copies)."""
    state = optimizer.state.get(param, {})
    out = {}
    for key, value in state.items():
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        out[key] = t.detach().to("cpu", copy=True)
    return out


def import_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, state: dict[str, torch.Tensor]) -> None:
    if not state:
        optimizer.state.pop(param, None)
        return
    new = {}
    for key, value in state.items():
        # Adam keeps ``step`` as a CPU float tensor (unless capturable); moments live with the param.
        new[key] = value.cpu().clone() if key == "step" else value.to(param.device, dtype=param.dtype, copy=True)
    optimizer.state[param] = new


def rebuild(optimizer: torch.optim.Optimizer | None, spec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """A new optimizer over ``params`` that keeps the old one's state for the parameters it had."""
    new = make_optimizer(spec, params)
    if optimizer is not None:
        for p in params:
            if p in optimizer.state:
                new.state[p] = optimizer.state[p]
        set_lr(new, optimizer.param_groups[0]["lr"])
    return new
