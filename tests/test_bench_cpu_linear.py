"""jobs/bench_cpu_linear.py: aten against oneDNN-packed linears, side by side (on a tiny model here; the
job's SmolLM2 shape only changes how long it takes)."""

from __future__ import annotations

import json

import pytest

import evaluation.bench_cpu_linear as bench
from operators.cpu_linear import PackedLinear, pack_linears
from tests.tiny_models import tiny_llama


def test_the_benchmark_prints_a_row_per_width_and_writes_its_figures(tmp_path, monkeypatch, capsys):
    model = tiny_llama(seed=0, num_hidden_layers=2)[0].eval()
    monkeypatch.setattr(bench, "smollm2_shaped", lambda seed=0: model)
    packed = []
    monkeypatch.setattr(bench, "pack_linears", lambda m: packed.append(m) or pack_linears(m))
    monkeypatch.setattr(bench, "SMOLLM2", {"vocab_size": model.config.vocab_size})  # ids the tiny model has
    out = tmp_path / "widths.json"
    assert bench.main(["--widths", "1", "3", "--context", "5", "--repeats", "2", "--json", str(out)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [line.split(" | ")[0] for line in table] == ["| 1", "| 3"]
    # The oneDNN side is a packed copy of the model, whatever its size; the aten side is the model itself.
    assert len(packed) == 1 and packed[0] is not model and isinstance(packed[0].lm_head, PackedLinear)
    assert not isinstance(model.lm_head, PackedLinear)
    rows = json.loads(out.read_text())["rows"]
    assert [r["width"] for r in rows] == [1, 3]
    assert all(r["aten_ms"] > 0 and r["onednn_ms"] > 0 for r in rows)
    assert rows[0]["aten_vs_step"] == rows[0]["onednn_vs_step"] == 1.0
    ratio = rows[1]["aten_ms"] / rows[1]["onednn_ms"]  # from rounded ms: equal to 10 % at these sizes
    assert abs(rows[1]["speedup"] - ratio) < 0.1 * ratio


def test_without_the_packed_op_it_says_so_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(bench, "packing_available", lambda: False)
    assert bench.main(["--widths", "1"]) == 2
    assert "no oneDNN packed linear" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--widths", "0"])
    assert exit_info.value.code == 2
