"""The benchmark scripts run: their functions on a tiny parameter list, the table names every provider."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

import sharpfused

from . import helpers

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import e2e  # noqa: E402
import plot  # noqa: E402
import run  # noqa: E402
import shapes  # noqa: E402

TINY = [(7, 5), (3,), (33,), (4, 3, 3, 2)]


def test_run_measures_every_primitive_and_step_with_baselines(tmp_path):
    cpu = torch.device("cpu")
    rows = run.measure(TINY, "tiny", torch.float32, cpu, repeat=2, warmup=1, copy_gbps=10.0)
    table = run.format_table(rows)
    for name in ["sq_norm", "perturb_", "restore_", "dot_norms", "combine_", "restore_sgd_", "restore_adamw_"]:
        provs = {r["provider"] for r in rows if r["kind"] == "primitive" and r["op"] == name}
        assert provs == {"eager-loop", "sharpfused-torch"}, (name, provs)
    algos = run.algorithms()
    assert {"SAM", "ASAM"} <= set(algos)
    for algo in algos:
        provs = {r["provider"] for r in rows if r["kind"] == "step" and r["op"] == algo}
        assert provs == {"eager-loop", "eager-foreach", "sharpfused-torch"}, (algo, provs)
    for prov in ("eager-loop", "eager-foreach", "sharpfused-torch"):
        assert f"| {prov} |" in table
    assert table.count("\n") == len(rows) + 1
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] > 0
        if r["provider"] == "eager-loop":
            assert r["vs_eager-loop"] == 1.0
    # CSV round trip and plots from it
    path = tmp_path / "dev.csv"
    run.append_csv(rows, path, "test device")
    run.append_csv(rows[:3], path, "test device")
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows) + 3 and back[0]["device"] == "test device" and back[0]["set"] == "tiny"
    pngs = plot.plot_csv(path)
    assert {p.name for p in pngs} == {"dev_step.png", "dev_primitive.png"}


def test_bf16_step_rows_and_byte_model():
    rows = run.measure(TINY, "tiny", torch.bfloat16, torch.device("cpu"), repeat=1, warmup=1, copy_gbps=10.0,
                       prims=["restore_"], algos=["SAM"])  # fmt: skip
    assert [r["op"] for r in rows] == ["restore_", "restore_", "SAM", "SAM", "SAM"]
    n = shapes.numel(TINY)
    r = rows[0]
    assert abs(r["gbps"] - n * 2 * run.PRIMITIVE_BYTES["restore_"] / r["median_ms"] / 1e6) < 1e-9


def test_step_byte_model_counts_what_the_code_moves():
    """Bytes per element of each step as counted from the primitives it calls (the final gradient
    check's sq_norm included), never below the minimum; docs/benchmarks.md has the same table."""
    got = {a: run.step_bytes(a) for a in run.algorithms()}
    assert got == {"SAM": 11, "ASAM": 12, "GSAM": 18, "SAM-AdamW": 13}, f"update docs/benchmarks.md: {got}"
    assert all(got[a] >= run.STEP_MIN_BYTES[a] for a in got)
    rows = run.measure(TINY, "tiny", torch.float32, torch.device("cpu"), repeat=1, warmup=1, copy_gbps=10.0,
                       prims=[], algos=["GSAM"])  # fmt: skip
    assert all(r["bytes"] == 18 and r["min_bytes"] == 17 for r in rows)
    assert "| 18b (min 17b) |" in run.format_table(rows)


def test_fresh_grads_rows_and_rebuilds():
    """--fresh-grads: each step also timed with other gradient tensors every step and every Triton
    table rebuilt (layouts kept); the same bytes are counted."""
    rows = run.measure(TINY, "tiny", torch.float32, torch.device("cpu"), repeat=1, warmup=1, copy_gbps=10.0,
                       prims=[], algos=["SAM"], fresh_grads=True)  # fmt: skip
    assert [r["op"] for r in rows] == ["SAM"] * 3 + ["SAM fresh-grads"] * 3
    assert rows[0]["bytes"] == rows[3]["bytes"]
    if not helpers.TRITON_INTERPRET:
        return  # the rebuild count below runs the Triton backend on CPU tensors
    from sharpfused.kernels import table

    step, opt = run.step_call(sharpfused.SAM, {"backend": "triton"}, TINY, torch.float32, torch.device("cpu"), fresh=True)
    seen, uploads = [], []
    for _ in range(4):
        step()
        seen.append([id(p.grad) for g in opt.param_groups for p in g["params"]])
        uploads.append(table.STATS["uploads"])
    assert seen[0] != seen[1] and seen[0] == seen[2]  # two gradient sets in turn
    assert len({b - a for a, b in zip(uploads, uploads[1:])}) == 1 and uploads[1] > uploads[0]  # rebuilt every step


def test_shape_sets():
    assert len(shapes.resnet50()) == 161 and abs(shapes.numel(shapes.resnet50()) - 25.56e6) < 0.01e6
    assert len(shapes.gpt2_small()) == 148 and abs(shapes.numel(shapes.gpt2_small()) - 124.44e6) < 0.01e6


def test_e2e_runs_tiny():
    cpu = torch.device("cpu")
    make, loss_fn, _ = e2e.workloads(cpu, quick=True)["resnet"]
    for mode in ("base", "eager-loop SAM", "sharpfused SAM"):
        r = e2e.measure(make, loss_fn, mode, cpu, steps=1, warmup=1)
        assert r["step_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["opt_ms"] > 0 and r["frac"] > 0
