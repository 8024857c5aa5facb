"""Which ranks hold which parameter, and the gradient all-reduce among them.

Every parameter has a key ``(layer, name)`` and a *holder set*: the ranks holding its layer (one
stage of every pipeline, all lanes of that stage). The tied embedding weight has one key (the
embedding's) whose holder set is the union of the first and the last layer's holders. Each
distinct holder set with more than one rank gets one process group, built once per generation
in the same order on every rank. After the last backward of a step, each group all-reduces
(sum) one flat bucket of its parameters' gradients, in a fixed global order of groups, so no two
ranks can wait on each other in opposite orders.

Gradients are already scaled by ``1 / global_batch_size`` (the loss is a mean over the global
batch), so the sum over microbatches, lanes and pipelines is the gradient of one step over the
whole global batch: equivalent to summing per-microbatch mean losses and dividing by the global
number of microbatches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from oobleck.worker.failures import communicating

ParamKey = tuple[int, str]


@dataclass(frozen=True)
class ParamPlacement:
    """Per-key holder sets for a whole plan (identical on every rank)."""

    layer_holders: Mapping[int, tuple[int, ...]]
    tied: tuple[str, str] | None
    num_layers: int

    def key_of(self, layer: int, name: str) -> ParamKey:
        """Canonical key: the head's tied weight is the embedding's."""
        if self.tied is not None and layer == self.num_layers - 1 and name == self.tied[1]:
            return (0, self.tied[0])
        return (layer, name)

    def holders_of(self, key: ParamKey) -> tuple[int, ...]:
        layer = key[0]
        if self.tied is not None and key == (0, self.tied[0]):
            return tuple(sorted(set(self.layer_holders[0]) | set(self.layer_holders[self.num_layers - 1])))
        return self.layer_holders[layer]

    def holder_sets(self) -> list[tuple[int, ...]]:
        """Every distinct holder set with more than one rank, in a fixed order."""
        sets = set(self.layer_holders.values())
        if self.tied is not None:
            sets.add(self.holders_of((0, self.tied[0])))
        return sorted(s for s in sets if len(s) > 1)


def placement(
    layer_holders: Mapping[int, tuple[int, ...]], tied: tuple[str, str] | None, num_layers: int
) -> ParamPlacement:
    return ParamPlacement(layer_holders=dict(layer_holders), tied=tied, num_layers=num_layers)


def local_params(layers: Mapping[int, nn.Module], where: ParamPlacement) -> dict[ParamKey, nn.Parameter]:
    """This rank's parameters by canonical key (a tied weight held twice appears once)."""
    out: dict[ParamKey, nn.Parameter] = {}
    for layer in sorted(layers):
        for name, p in layers[layer].named_parameters():
            if p.requires_grad:
                out.setdefault(where.key_of(layer, name), p)
    return out


class GradSync:
    """Process groups per holder set and the per-step gradient all-reduce."""

    def __init__(self, where: ParamPlacement, rank: int, timeout=None) -> None:
        self.where = where
        self.rank = rank
        self.groups: dict[tuple[int, ...], object] = {}
        kwargs = {"timeout": timeout} if timeout is not None else {}
        for ranks in where.holder_sets():
            # Every rank creates every group, in the same order (torch.distributed requires it).
            with communicating(f"creating the gradient group of ranks {list(ranks)} failed"):
                group = dist.new_group(list(ranks), **kwargs)
            if rank in ranks:
                self.groups[ranks] = group

    def all_reduce(self, params: Mapping[ParamKey, nn.Parameter]) -> None:
        """Sum the gradients of ``params`` among each key's holders (a failed all-reduce: a peer
        is gone, :class:`~oobleck.worker.failures.PeerGone`)."""
        buckets: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for key in sorted(params):
            ranks = self.where.holders_of(key)
            if len(ranks) > 1:
                buckets.setdefault(ranks, []).append(params[key])
        for ranks in self.where.holder_sets():
            if ranks not in buckets:
                continue
            ps = buckets[ranks]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
            flat = torch.cat([g.reshape(-1) for g in grads])
            with communicating("gradient sync failed"):
                dist.all_reduce(flat, group=self.groups[ranks])
            offset = 0
            for p, g in zip(ps, grads, strict=True):
                n = g.numel()
                chunk = flat[offset : offset + n].view_as(g)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                offset += n

    def local_sq_norm(self, params: Mapping[ParamKey, nn.Parameter]) -> torch.Tensor:
        """Sum of squared gradients of the keys this rank counts (the lowest holder counts a key),
        so an all-reduce over the world counts every parameter exactly once."""
        mine = [
            p.grad for key, p in params.items() if p.grad is not None and min(self.where.holders_of(key)) == self.rank
        ]
        if not mine:
            return torch.zeros((), dtype=torch.float64)
        norms = torch._foreach_norm(mine)
        return torch.stack(norms).double().pow(2).sum().cpu()
