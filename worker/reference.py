"""The single-process reference: a plain PyTorch loop over the whole model.

Any plan must produce the same parameters and losses as this loop (tests), and the benchmark
uses it as the single-process baseline. It uses the same model, data order, loss definition
(mean over the global batch of per-sample losses), optimizer and learning-rate schedule.
"""

from __future__ import annotations

import functools

import torch

from oobleck.common.modelconfig import validate_model_config
from oobleck.worker import optim
from oobleck.worker.data import DataPosition, GlobalOrder, make_dataset, make_example
from oobleck.worker.models import ModelDef, SequentialModel, param_dtype, per_sample_loss


class ReferenceTrainer:
    def __init__(self, spec, device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.cfg = validate_model_config(spec)
        self.model_def = ModelDef(self.cfg, spec.seed)
        self.model = SequentialModel(self.model_def, device, param_dtype(spec.precision))
        self.device = torch.device(device)
        self.dataset = make_dataset(spec.data, self.cfg.vocab_size, self.cfg.objective)
        self.order = GlobalOrder(self.dataset.num_samples, spec.global_batch_size, spec.microbatch_size, spec.data.seed)
        self.optimizer = optim.make_optimizer(spec.optimizer, self.model.parameters())
        self.position = DataPosition()

    def step(self) -> float:
        spec = self.spec
        start = self.order.step_start(self.position)
        batch, after = self.order.batch(self.position)
        total = 0.0
        for k in range(spec.num_microbatches):
            idx = self.order.microbatch(batch, k)
            inputs, labels = make_example(
                self.dataset.tokens(idx), idx, self.cfg.objective, self.cfg.vocab_size - 1, spec.data.seed, start.epoch
            )
            per_sample = per_sample_loss(self.model(inputs.to(self.device)), labels.to(self.device))
            (per_sample.sum() / spec.global_batch_size).backward()
            total += float(per_sample.detach().double().sum())
        if spec.optimizer.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.optimizer.grad_clip_norm)
        optim.set_lr(self.optimizer, optim.lr_at(spec.optimizer, self.position.step))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position = after
        return total / spec.global_batch_size

    def layer_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Parameters per layer (``name -> tensor``), comparable with the engine's export."""
        return {
            i: {n: p.detach().clone() for n, p in layer.named_parameters(remove_duplicate=False)}
            for i, layer in enumerate(self.model.layers)
        }


def reference_run(spec_yaml: str, steps: int) -> tuple[list[float], dict[int, dict[str, torch.Tensor]]]:
    """Losses of ``steps`` steps and the final per-layer parameters of the reference loop for the
    job spec ``spec_yaml``. Tests call it with the same spec many times, so results are cached
    (keyed by the YAML text; callers must not modify the returned tensors)."""
    return _reference_run(spec_yaml, steps)


@functools.cache
def _reference_run(spec_yaml: str, steps: int):
    from oobleck.common.jobspec import parse_job_spec

    ref = ReferenceTrainer(parse_job_spec(spec_yaml))
    losses = [ref.step() for _ in range(steps)]
    return losses, ref.layer_state()
