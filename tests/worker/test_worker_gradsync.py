"""Pure parts of gradient sync: holder sets, tied weights, norm ownership; DistInit checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oobleck.worker.gradsync import GradSync, local_params, placement
from oobleck.worker.rendezvous import DistInit


def test_tied_weight_has_the_union_of_first_and_last_holders() -> None:
    where = placement({0: (0, 2), 1: (0, 3), 2: (1, 4), 3: (1, 4)}, ("tok.weight", "out.weight"), 4)
    assert where.key_of(3, "out.weight") == (0, "tok.weight")
    assert where.key_of(3, "ln.weight") == (3, "ln.weight")
    assert where.holders_of((0, "tok.weight")) == (0, 1, 2, 4)
    assert where.holders_of((0, "pos.weight")) == (0, 2)
    assert where.holder_sets() == [(0, 1, 2, 4), (0, 2), (0, 3), (1, 4)]
    untied = placement({0: (0,), 1: (0,), 2: (1,)}, None, 3)
    assert untied.holder_sets() == []  # one pipeline, no tie: nothing to all-reduce


def test_local_params_dedupe_a_tied_weight_and_norm_counts_it_once() -> None:
    emb, head = nn.Module(), nn.Module()
    emb.tok = nn.Embedding(4, 2)
    head.out = nn.Linear(2, 4, bias=False)
    head.out.weight = emb.tok.weight  # one process holds both ends
    where = placement({0: (0, 1), 1: (0, 1)}, ("tok.weight", "out.weight"), 2)
    params = local_params({0: emb, 1: head}, where)
    assert list(params) == [(0, "tok.weight")]
    params[(0, "tok.weight")].grad = torch.full((4, 2), 2.0)
    sync = GradSync.__new__(GradSync)  # no process group needed for the norm's ownership rule
    sync.where, sync.rank = where, 0
    assert float(sync.local_sq_norm(params)) == pytest.approx(32.0)
    sync.rank = 1
    assert float(sync.local_sq_norm(params)) == 0.0  # rank 0 counts it, rank 1 does not


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of store"),
        ({"file": "/tmp/x", "host": "h", "port": 1}, "exactly one of store"),
        ({"host": "h"}, "port"),
        ({"file": "/tmp/x", "backend": "mpi"}, "backend"),
        ({"file": "/tmp/x", "timeout_s": 0}, "timeout_s"),
    ],
)
def test_dist_init_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistInit(**kwargs)
