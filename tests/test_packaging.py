"""Packaging and the scripts around the package: the license metadata and file, bench/plot.py's
command line, and that the examples and bench/run.py leave the committed result folders alone
unless asked (their default output is the untracked out/ at the repository root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ["examples/results", "bench/results"]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def _need_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``folder``."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _committed_state() -> tuple[str, dict]:
    """git status of the committed result folders and the files' sizes and times (a rewrite with the
    same bytes changes no git status, but does change the time)."""
    status = _git("status", "--porcelain", "--", *COMMITTED)
    return status, {f: _snapshot(ROOT / f) for f in COMMITTED}


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_license_file_and_spdx_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright 2026 The sharpfused authors" in text
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # the SPDX string, not the deprecated table
    assert project.get("license-files") == ["LICENSE"]


def test_out_folder_is_ignored():
    _need_git()
    assert _git("check-ignore", "out/bench/x.csv", "out/examples/compare.md").split() == [
        "out/bench/x.csv",
        "out/examples/compare.md",
    ]


def test_plot_help_runs():
    r = _run(["bench/plot.py", "--help"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--results" in r.stdout


def test_plot_errors_without_a_traceback(tmp_path):
    r = _run(["bench/plot.py", "--results", str(tmp_path)], timeout=120)
    assert r.returncode == 2 and "no CSV given" in r.stderr and "Traceback" not in r.stderr
    r = _run(["bench/plot.py", str(tmp_path / "missing.csv")], timeout=120)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_plot_draws_the_csvs_of_a_results_folder(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import torch

    rows = run.measure([(7, 5), (3,)], "tiny", torch.float32, torch.device("cpu"), repeat=1, warmup=1,
                       copy_gbps=10.0, prims=["restore_"], algos=["SAM"])  # fmt: skip
    run.append_csv(rows, tmp_path / "dev.csv", "test device")
    r = _run(["bench/plot.py", "--results", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in tmp_path.glob("*.png")} == {"dev_step.png", "dev_primitive.png"}


def test_bench_default_run_writes_to_out_not_bench_results():
    """A default bench/run.py (tiny: one primitive, ResNet-50 / 64) appends to out/bench/<device>.csv
    and leaves bench/results as it was; the file it grew is put back afterwards."""
    _need_git()
    out = ROOT / "out" / "bench"
    before_out, before = _snapshot(out), _committed_state()
    sizes = {p: p.stat().st_size for p in out.glob("*.csv")} if out.is_dir() else {}
    try:
        r = _run(["bench/run.py", "--sets", "resnet50", "--scale", "64", "--repeat", "1", "--ops", "restore_",
                  "--dtypes", "float32"])  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert "rows appended to out/bench/" in r.stdout.replace(os.sep, "/")
        assert _committed_state() == before
        after_out = _snapshot(out)
        assert any(after_out.get(f) != v for f, v in before_out.items()) or set(after_out) - set(before_out)
    finally:  # leave out/bench as the test found it
        for p in out.glob("*") if out.is_dir() else []:
            if p.suffix == ".csv" and p in sizes:
                with open(p, "r+b") as f:
                    f.truncate(sizes[p])
            elif str(p.relative_to(out)) not in before_out:
                p.unlink()


def test_bench_results_argument_still_chooses_the_folder(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert run.csv_path("AMD EPYC") == ROOT / "out" / "bench" / "AMD_EPYC.csv"
    assert run.csv_path("x", str(tmp_path)) == tmp_path / "x.csv"
    assert run.csv_path("x", "bench/results") == Path("bench/results/x.csv")  # asked for: the committed folder


def test_examples_default_run_writes_to_out_not_examples_results():
    """label_noise.py (1 epoch, 1 seed, one noise level) writes out/examples/label_noise.{md,png} by
    default and touches nothing committed (compare.py's --out is checked below)."""
    _need_git()
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    out = ROOT / "out" / "examples"
    before = _committed_state()
    saved = {n: (out / n).read_bytes() for n in ("label_noise.md", "label_noise.png") if (out / n).is_file()}
    try:
        r = _run(["examples/label_noise.py", "--epochs", "1", "--seeds", "1", "--noise", "0"])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "wrote out/examples/label_noise.md" in r.stdout.replace(os.sep, "/")
        assert (out / "label_noise.md").is_file() and (out / "label_noise.png").is_file()
        assert "--out" not in (out / "label_noise.md").read_text()
        assert _committed_state() == before
    finally:  # put back what a user had there
        for n in ("label_noise.md", "label_noise.png"):
            if n in saved:
                (out / n).write_bytes(saved[n])
            elif (out / n).exists():
                (out / n).unlink()


def test_compare_defaults_to_out():
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    r = _run(["examples/compare.py", "--help"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--out" in r.stdout and "out/examples" in r.stdout
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import compare
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert compare.OUT == ROOT / "out" / "examples"
    assert compare.out_flag(compare.OUT) == "" and compare.out_flag(ROOT / "examples" / "results") == (
        " --out examples/results"
    )
