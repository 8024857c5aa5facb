"""``oobleck-sim`` in-process: run (text and JSON), figures, errors."""

import csv
import json

import pytest

from oobleck.sim.cli import main


def test_run_json(capsys):
    assert main(["run", "--model", "GPT-3-6_7b", "--trace", "10m", "--system", "varuna", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["system"] == "varuna"
    assert out["compat"] == "intent"
    assert out["throughput_sps"] >= 0
    assert {"useful_s", "lost_s", "reconfiguration_s", "checkpoint_s", "stopped_s"} <= set(out["breakdown"])


def test_run_text_research(capsys):
    args = ["run", "--model", "GPT-3-6_7b", "--trace", "10m", "--system", "varuna", "--compat", "research"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("varuna on 10m (GPT-3-6_7b, compat research): 0.2551 samples/s")
    for label in ("useful work", "lost work", "reconfiguration/restart", "checkpoint"):
        assert label in out


def test_run_trace_file(tmp_path, capsys):
    path = tmp_path / "mine.csv"
    path.write_text("".join(f"0,add,n{i}\n" for i in range(13)) + "600000,remove,n1\n900000,add,end\n")
    assert main(["run", "--model", "BERT-large", "--trace", str(path), "--system", "oobleck", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"] == "mine"
    assert out["reconfigurations"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "GPT-9", "--trace", "10m", "--system", "oobleck"], "model: unknown model 'GPT-9'"),
        (["--model", "BERT-large", "--trace", "nope", "--system", "oobleck"], "trace: 'nope' is neither"),
        (["--trace", "10m", "--system", "oobleck"], "--model: required"),
        (["--profile", "p.json", "--trace", "10m", "--system", "varuna"], "only the oobleck system"),
    ],
)
def test_bad_input_names_the_field(args, message, capsys):
    assert main(["run", *args]) == 2
    assert message in capsys.readouterr().err


def test_figures(tmp_path, capsys):
    assert main(["figures", "--out", str(tmp_path), "--models", "GPT-3-6_7b", "--no-progress"]) == 0
    written = capsys.readouterr().out.split()
    assert str(tmp_path / "tput-vs-freq-gpt3-6_7b.png") in written
    assert str(tmp_path / "cloud-traces.png") in written
    for name in ("tput-vs-freq-gpt3-6_7b.png", "cloud-traces.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # 7 traces x 3 systems x 2 semantics (bars and reference markers)
    assert len(rows) == 42
    ref = [r for r in rows if (r["trace"], r["system"], r["compat"]) == ("10m", "varuna", "research")]
    assert float(ref[0]["throughput_sps"]) == pytest.approx(0.2551, abs=1e-3)
