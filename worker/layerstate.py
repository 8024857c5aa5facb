"""A layer's training state as CPU tensors: export, import, and applying a step to it.

A layer state is ``{"param.<name>": tensor, "opt.<name>.<key>": tensor}`` (and the gradients,
``grad.<name>``, when a step's vote failed and they are kept): what a reconfiguration carries
from one generation to the next, what the layer copies send and what checkpoints store. It does
not depend on the plan, so a state exported under one plan imports under any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from oobleck.worker import optim

LayerStates = dict[int, dict[str, torch.Tensor]]


def export_layers(
    layers: Mapping[int, nn.Module],
    optimizer: torch.optim.Optimizer,
    indices: Iterable[int],
    *,
    with_grads: bool = False,
    holder: str = "this process",
) -> LayerStates:
    """CPU copies of the parameters and optimizer state of the layers ``indices`` (and their
    gradients, when asked). A parameter shared within a layer appears once."""
    out = {}
    for i in indices:
        if i not in layers:
            raise KeyError(f"layer {i} is not held by {holder} (holds {sorted(layers)})")
        state: dict[str, torch.Tensor] = {}
        for name, p in layers[i].named_parameters(remove_duplicate=False):
            if f"param.{name}" in state:
                continue
            state[f"param.{name}"] = p.detach().to("cpu", copy=True)
            if with_grads and p.grad is not None:
                state[f"grad.{name}"] = p.grad.detach().to("cpu", copy=True)
            for key, value in optim.export_state(optimizer, p).items():
                state[f"opt.{name}.{key}"] = value
        out[i] = state
    return out


def import_layers(
    layers: Mapping[int, nn.Module],
    optimizer: torch.optim.Optimizer,
    states: Mapping[int, Mapping[str, torch.Tensor]],
    *,
    holder: str = "this process",
) -> None:
    """Load parameters and optimizer state into held layers (from :func:`export_layers` on any
    process, or from a checkpoint)."""
    for i, state in states.items():
        if i not in layers:
            raise KeyError(f"layer {i} is not held by {holder} (holds {sorted(layers)})")
        for name, p in layers[i].named_parameters(remove_duplicate=False):
            key = f"param.{name}"
            if key not in state:
                raise KeyError(f"layer {i}: missing {key}")
            with torch.no_grad():
                p.copy_(state[key])
            prefix = f"opt.{name}."
            opt_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            optim.import_state(optimizer, p, opt_state)


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """What sending a layer state costs (gradients are never sent)."""
    return sum(t.numel() * t.element_size() for k, t in state.items() if not k.startswith("grad."))


def without_grads(states: Mapping[int, Mapping[str, torch.Tensor]]) -> LayerStates:
    return {i: {k: t for k, t in st.items() if not k.startswith("grad.")} for i, st in states.items()}


def roll_forward(
    states: Mapping[int, Mapping[str, torch.Tensor]], optimizer_spec, sq_total: float, step_index: int
) -> LayerStates:
    """Apply the update of the step at ``step_index`` (0-based) to layer states that hold its
    gradients (``grad.<name>``), exactly as the step would have: the same clipping by the global
    norm ``sqrt(sq_total)``, learning rate and optimizer."""
    norm = math.sqrt(sq_total)
    clip = optimizer_spec.grad_clip_norm
    coef = clip / (norm + 1e-6) if clip is not None else 1.0
    out: LayerStates = {}
    for layer, state in states.items():
        names = [k.removeprefix("param.") for k in state if k.startswith("param.")]
        params = {n: nn.Parameter(state[f"param.{n}"].clone()) for n in names}
        opt = optim.make_optimizer(optimizer_spec, params.values())
        for n, p in params.items():
            grad = state.get(f"grad.{n}")
            p.grad = None if grad is None else grad.clone()
            if p.grad is not None and coef < 1.0:
                p.grad.mul_(coef)
            prefix = f"opt.{n}."
            optim.import_state(opt, p, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        optim.set_lr(opt, optim.lr_at(optimizer_spec, step_index))
        opt.step()
        new: dict[str, torch.Tensor] = {}
        for n, p in params.items():
            new[f"param.{n}"] = p.detach()
            for key, value in optim.export_state(opt, p).items():
                new[f"opt.{n}.{key}"] = value
        out[layer] = new
    return out
