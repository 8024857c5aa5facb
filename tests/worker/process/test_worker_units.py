"""Pure parts of the worker entry point: settings, rank lookup, device choice."""

from __future__ import annotations

import pytest

from oobleck.common.validate import ConfigError
from oobleck.planner.types import Stage, Template
from oobleck.worker.failures import WorkerError
from oobleck.worker.layout import PipelineSpec, PlanSpec
from oobleck.worker.main import failure_report
from oobleck.worker.run import rank_of
from oobleck.worker.settings import WorkerSettings, choose_device


def two_slot_plan() -> PlanSpec:
    stages = (
        Stage((0, 2), node=0, gpus=1, latency_ms=0.0, memory_bytes=0),
        Stage((2, 4), node=0, gpus=1, latency_ms=0.0, memory_bytes=0),
    )
    tpl = Template(num_nodes=1, stages=stages, iteration_ms=0.0, bottleneck_ms=0.0)
    return PlanSpec(
        pipelines=(PipelineSpec((7,), 4), PipelineSpec((9,), 4)),
        templates={1: tpl},
        ranks={7: (3, 1), 9: (0, 2)},
        gpus_per_node=2,
    )


def test_rank_of_maps_slot_i_to_the_nodes_ith_rank() -> None:
    plan = two_slot_plan()
    assert [rank_of(plan, 7, s) for s in (0, 1)] == [3, 1]
    assert [rank_of(plan, 9, s) for s in (0, 1)] == [0, 2]
    assert rank_of(plan, 8, 0) is None
    with pytest.raises(WorkerError, match="node 7 has 2 ranks, this worker is slot 2"):
        rank_of(plan, 7, 2)


def test_choose_device() -> None:
    assert choose_device("auto", 0, 0) == ("cpu", "gloo")
    assert choose_device("auto", 1, 2) == ("cuda:1", "nccl")
    assert choose_device("cpu", 1, 2) == ("cpu", "gloo")
    assert choose_device("cuda", 0, 1) == ("cuda:0", "nccl")
    with pytest.raises(WorkerError, match="no CUDA device"):
        choose_device("cuda", 0, 0)
    with pytest.raises(WorkerError, match="slot 2: only 2 CUDA devices"):
        choose_device("auto", 2, 2)


def test_settings_from_env() -> None:
    assert WorkerSettings.from_env({}) == WorkerSettings()
    s = WorkerSettings.from_env(
        {
            "OOBLECK_TORCH_THREADS": "4",
            "OOBLECK_WORKER_DEVICE": "CPU",
            "OOBLECK_COLLECTIVE_TIMEOUT_S": "12.5",
            "OOBLECK_RECONFIGURE_WAIT_S": "30",
            "OOBLECK_START_WAIT_S": "5",
            "OOBLECK_STEP_RETRIES": "0",
        }
    )
    assert s == WorkerSettings(4, "cpu", 12.5, 30.0, 5.0, 0)
    assert WorkerSettings.from_env({"OOBLECK_TORCH_THREADS": "default"}).torch_threads is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OOBLECK_TORCH_THREADS": "0"}, "OOBLECK_TORCH_THREADS: must be >= 1, got 0"),
        ({"OOBLECK_TORCH_THREADS": "many"}, "OOBLECK_TORCH_THREADS: expected int, got 'many'"),
        ({"OOBLECK_WORKER_DEVICE": "tpu"}, "OOBLECK_WORKER_DEVICE: must be one of auto, cpu, cuda, got 'tpu'"),
        ({"OOBLECK_COLLECTIVE_TIMEOUT_S": "-1"}, "OOBLECK_COLLECTIVE_TIMEOUT_S: must be > 0, got -1.0"),
        ({"OOBLECK_STEP_RETRIES": "-2"}, "OOBLECK_STEP_RETRIES: must be >= 0, got -2"),
    ],
)
def test_settings_errors_name_the_variable(env, message) -> None:
    with pytest.raises(ValueError) as info:
        WorkerSettings.from_env(env)
    assert str(info.value) == message


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_failure_report_carries_the_traceback_of_a_bug_only() -> None:
    bug = _raised(RuntimeError("boom"))
    report = failure_report(bug)
    assert report.startswith("RuntimeError: boom\nTraceback (most recent call last):")
    assert report.endswith("raise exc") and report.count("boom") == 1  # innermost frame last
    assert failure_report(_raised(WorkerError("no start command"))) == "WorkerError: no start command"
    assert failure_report(_raised(ConfigError("model.name", "bad"))).startswith("ConfigError: ")
    deep = _raised(RuntimeError("x" * 3000))
    short = failure_report(deep, limit=3500)
    assert len(short) <= 3500 and short.startswith("RuntimeError: xxx") and short.endswith("raise exc")
    frames = [_raised(RuntimeError("deep"))]
    for _ in range(200):  # a long chain of causes: the oldest part of the trace goes first
        frames.append(_raised(RuntimeError("again")))
        frames[-1].__cause__ = frames[-2]
    long = failure_report(frames[-1], limit=1000)
    assert len(long) <= 1000 and long.startswith("RuntimeError: again\n...") and long.endswith("raise exc")
