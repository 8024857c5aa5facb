"""Per-layer profile of a model on the real device, as ``oobleck-profile/1`` JSON.

For one microbatch size, each layer is run on realistic inputs (the previous layers' outputs):
forward and backward times are medians of ``runs`` timed runs after ``warmup`` untimed ones
(the head's backward includes the loss); ``activation_bytes`` is the memory of the tensors the
layer saves for backward (unique storages, parameters excluded), ``output_bytes`` the size of its
output, ``param_bytes`` the size of its parameters. Results are cached in a directory under the key the
master's profile cache uses too (:mod:`oobleck.common.profilekey`: the model config, microbatch
size, sequence length, precision and the node's device kind), so changing any of them
invalidates the cache.

``python -m oobleck.worker.profiler --spec JOB.yaml --out PROFILE.json [--device auto|cpu|cuda]
[--cache-dir DIR] [--device-key KIND]`` is what an agent runs for the master's ``Profile`` command: it writes the
profile atomically to ``--out`` and exits 0; a bad job spec exits 2, any other failure 1, with
one line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from oobleck.common.files import write_json
from oobleck.common.modelconfig import validate_model_config
from oobleck.common.profilekey import profile_key
from oobleck.planner import PROFILE_FORMAT, parse_profile
from oobleck.worker.data import make_dataset, make_example
from oobleck.worker.models import ModelDef, per_sample_loss

log = logging.getLogger(__name__)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0


def _saved_bytes(fn, params: set[int]) -> tuple[Any, int]:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def profile_model(spec, device: str | torch.device = "cpu", warmup: int = 2, runs: int = 5) -> dict[str, Any]:
    """Profile every layer of ``spec``'s model for ``spec.microbatch_size``; returns the JSON dict."""
    if warmup < 0 or runs < 1:
        raise ValueError(f"warmup >= 0 and runs >= 1 required, got warmup={warmup}, runs={runs}")
    device = torch.device(device)
    cfg = validate_model_config(spec)
    model = ModelDef(cfg, spec.seed)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if spec.precision == "bf16"
        else contextlib.nullcontext()
    )
    dataset = make_dataset(spec.data, cfg.vocab_size, cfg.objective)
    idx = [i % dataset.num_samples for i in range(spec.microbatch_size)]
    inputs, labels = make_example(dataset.tokens(idx), idx, cfg.objective, cfg.vocab_size - 1, spec.data.seed, 0)
    x: torch.Tensor = inputs.to(device)
    labels = labels.to(device)
    out_layers = []
    for i in range(model.num_layers):
        layer = model.build_layer(i, device)
        params = {p.data_ptr() for p in layer.parameters()}
        param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
        last = i == model.num_layers - 1
        inp = x if i == 0 else x.detach().requires_grad_(True)

        def forward(layer=layer, inp=inp, last=last):
            with autocast:
                y = layer(inp)
            return per_sample_loss(y, labels).mean() if last else y

        fwd, bwd = [], []
        act_bytes = 0
        y = None
        for r in range(warmup + runs):
            _sync(device)
            t0 = time.perf_counter()
            y, act_bytes = _saved_bytes(forward, params)
            _sync(device)
            t_fwd = (time.perf_counter() - t0) * 1000.0
            grad = None if last else torch.ones_like(y)
            t_bwd = _timed(lambda y=y, grad=grad: torch.autograd.backward(y, grad), device)
            layer.zero_grad(set_to_none=True)
            if r >= warmup:
                fwd.append(t_fwd)
                bwd.append(t_bwd)
        with torch.no_grad(), autocast:
            out = layer(inp)
        out_layers.append(
            {
                "name": model.layer_name(i),
                "forward_ms": statistics.median(fwd),
                "backward_ms": statistics.median(bwd),
                "param_bytes": int(param_bytes),
                "activation_bytes": int(act_bytes),
                "output_bytes": int(out.numel() * out.element_size()),
            }
        )
        x = out
        del layer, y
    profile = {
        "format": PROFILE_FORMAT,
        "model": f"{cfg.name}-L{cfg.num_blocks}-H{cfg.hidden_size}",
        "microbatch_size": spec.microbatch_size,
        "layers": out_layers,
    }
    parse_profile(profile)  # the planner must accept what we write
    return profile


def cache_key(spec, device_key: str) -> str:
    """The profile cache's key (:func:`oobleck.common.profilekey.profile_key`)."""
    return profile_key(spec, device_key)


def cached_profile(
    spec, cache_dir: str | Path, device: str | torch.device = "cpu", device_key: str | None = None, **kwargs
) -> dict[str, Any]:
    """The profile from ``cache_dir`` if one exists for this key, else measure and store it.
    ``device_key``: the node's device kind as its agent names it (default: this device's name
    and the torch version, for runs by hand)."""
    cache_dir = Path(cache_dir)
    key = device_key or f"{device_name(torch.device(device))}/torch-{torch.__version__}"
    path = cache_dir / f"profile-{cache_key(spec, key)}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            parse_profile(data)
            return data
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable cached profile %s: %s", path, exc)
    data = profile_model(spec, device, **kwargs)
    write_json(path, data, indent=1)
    return data


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from oobleck.common.jobspec import load_job_spec
    from oobleck.common.logs import setup_logging
    from oobleck.common.validate import ConfigError

    parser = argparse.ArgumentParser(prog="python -m oobleck.worker.profiler", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="job spec YAML (model, data, microbatch size, precision)")
    parser.add_argument("--out", required=True, help="where to write the oobleck-profile/1 JSON")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--cache-dir", default=None, help="reuse and store profiles here (keyed, see above)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the measurement (default 1)")
    parser.add_argument("--device-key", default="", help="the node's device kind for the cache key (from its agent)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        spec = load_job_spec(args.spec)
        validate_model_config(spec)
    except ConfigError as exc:
        print(f"profiler: {args.spec}: {exc}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    try:
        if args.cache_dir:
            data = cached_profile(spec, args.cache_dir, device, device_key=args.device_key or None)
        else:
            data = profile_model(spec, device)
        write_json(Path(args.out), data, indent=1)
    except Exception as exc:  # one line for the agent's nack; the traceback goes to the log
        log.exception("profiling failed")
        print(f"profiler: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
