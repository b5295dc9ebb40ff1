"""Prebuilt CUDA wheels, checked without a GPU and without compiling.

bench/pick_wheel.py decides whether bench/gpu_check.sh installs a wheel from bench/wheels/ or
builds the extension on the GPU machine: it must pick the wheel made for the machine's torch
minor, CUDA, python and kernel sources, and refuse every other. Fake wheels (zips with an empty
``_C*.so`` and csrc sources) stand in for real ones. sharpfused/_build.py's local version label
and torch pin are what name a wheel's torch ABI. The dry run's build row must report the decision.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sharpfused import _build

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
_spec = importlib.util.spec_from_file_location("pick_wheel", ROOT / "bench" / "pick_wheel.py")
pw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pw)

GPU = {"torch_version": "2.11.0+cu130", "cuda": "13.0", "py_tag": "cp312", "plat": "linux_x86_64"}
GOOD = "0.1.0+torch2.11.cu130"


def fake(directory: Path, version: str = GOOD, py_tag: str = "cp312", plat: str = "linux_x86_64", **kw) -> Path:
    return pw.fake_wheel(directory, version, py_tag, plat, CSRC, **kw)


def pick(directory: Path, **over):
    args = {**GPU, **over}
    return pw.pick(directory, args["torch_version"], args["cuda"], args["py_tag"], args["plat"], CSRC, over.get("arch"))


def test_picks_the_wheel_for_this_torch_cuda_and_python(tmp_path):
    want = fake(tmp_path)
    fake(tmp_path, "0.1.0+torch2.10.cu130")
    fake(tmp_path, "0.1.0+torch2.11.cu126")
    fake(tmp_path, GOOD, py_tag="cp311")
    got, refused = pick(tmp_path)
    assert got == want
    assert sorted(n for n, _ in refused) == sorted(p.name for p in tmp_path.glob("*.whl") if p != want)
    # a manylinux platform tag for this CPU is as good, and the patch release of torch does not matter
    other = tmp_path / "m"
    other.mkdir()
    many = fake(other, plat="manylinux_2_28_x86_64")
    assert pick(other, torch_version="2.11.3")[0] == many


@pytest.mark.parametrize(
    "wheel, machine, why",
    [
        ({"version": "0.1.0+torch2.10.cu130"}, {}, "built for torch 2.10"),
        ({}, {"torch_version": "2.12.0+cu130"}, "built for torch 2.11"),
        ({"version": "0.1.0+torch2.11.cu126"}, {}, "built for cu126"),
        ({}, {"cuda": "12.8"}, "built for cu130"),
        ({}, {"cuda": None, "torch_version": "2.11.0+cpu"}, "has no CUDA"),
        ({"py_tag": "cp311"}, {}, "this python is cp312"),
        ({}, {"py_tag": "cp313"}, "this python is cp313"),
        ({"plat": "linux_aarch64"}, {}, "platform linux_aarch64"),
        ({"version": "0.1.0"}, {}, "no +torchX.Y.cuNNN"),
        ({"version": "0.1.0+mytag"}, {}, "no +torchX.Y.cuNNN"),
        ({"stale": True}, {}, "other kernel sources"),
    ],
)
def test_refuses_a_wheel_for_another_torch_cuda_python_or_source(tmp_path, wheel, machine, why):
    w = fake(tmp_path, **wheel)
    got, refused = pick(tmp_path, **machine)
    assert got is None
    assert refused == [(w.name, refused[0][1])] and why in refused[0][1], refused


def test_refuses_a_wheel_without_the_extension(tmp_path):
    path = tmp_path / f"sharpfused-{GOOD}-cp312-cp312-linux_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("sharpfused/__init__.py", "")
    got, refused = pick(tmp_path)
    assert got is None and "holds 0 sharpfused/_C" in refused[0][1]


def test_picks_none_from_an_empty_or_missing_folder(tmp_path):
    assert pick(tmp_path) == (None, [])
    assert pick(tmp_path / "absent") == (None, [])


def test_newest_fitting_wheel_wins(tmp_path):
    old = fake(tmp_path)
    new = fake(tmp_path, plat="manylinux_2_28_x86_64")
    os.utime(old, (1_000_000, 1_000_000))
    assert pick(tmp_path)[0] == new


@pytest.mark.parametrize(
    "archs, gpu, covered",
    [
        ("8.0;9.0+PTX", "9.0", True),
        ("8.0;9.0+PTX", "8.0", True),
        ("8.0;9.0+PTX", "8.6", True),  # sm_80 SASS runs on 8.x
        ("8.0;9.0+PTX", "10.0", True),  # PTX 9.0 JIT-compiles for newer GPUs
        ("8.0;9.0+PTX", "7.5", False),
        ("8.0;9.0", "10.0", False),  # no PTX: SASS does not cross a major
        ("8.6 9.0", "8.0", False),
    ],
)
def test_arch_coverage(archs, gpu, covered):
    assert pw.arch_covers(archs, gpu) is covered


def test_arch_from_the_sidecar(tmp_path):
    w = fake(tmp_path)
    Path(str(w) + ".txt").write_text("wheel: x\narch_list: 8.0;9.0+PTX\ncommit: abc\n")
    assert pick(tmp_path, arch="9.0")[0] == w
    got, refused = pick(tmp_path, arch="7.5")
    assert got is None and "does not cover this GPU (7.5)" in refused[0][1]


def test_cli_prints_the_wheel_or_exits_1(tmp_path):
    args = [sys.executable, str(ROOT / "bench" / "pick_wheel.py"), "--dir", str(tmp_path), "--csrc", str(CSRC),
            "--torch", "2.11.0+cu130", "--cuda", "13.0", "--python-tag", "cp312", "--platform", "linux_x86_64"]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == "" and "no wheel in" in out.stderr
    w = fake(tmp_path)
    fake(tmp_path, "0.1.0+torch2.10.cu130")
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(w)
    assert "refused sharpfused-0.1.0+torch2.10.cu130" in out.stderr and "built for torch 2.10" in out.stderr


def test_self_check_exercises_both_outcomes():
    ok, summary = pw.self_check(CSRC)
    assert ok, summary
    assert "picks sharpfused-0.1.0+torch2.11.cu130-cp312-cp312-linux_x86_64.whl" in summary
    assert "decoys only: build" in summary and "empty folder: build" in summary


def test_dry_run_build_row_reports_the_decision(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake(wheels)  # a wheel for the GPU machine: this CPU torch must not take it
    env = {**os.environ, "BUILD_STAGE_ONLY": "1", "OUT": str(tmp_path / "out"), "WHEEL_DIR": str(wheels),
           "PYTHON": sys.executable}  # fmt: skip
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [r for r in out.stdout.splitlines() if re.match(r"^build +", r)]
    assert len(rows) == 1, out.stdout[-3000:]
    row = rows[0]
    assert re.match(r"^build +ok ", row), row
    assert "dry run, no compile: selection ok" in row
    assert "wheel present: picks sharpfused-0.1.0+torch2.11.cu130-cp312-cp312-linux_x86_64.whl" in row
    assert "decoys only: build" in row and "empty folder: build" in row
    assert "here: would build (no wheel in" in row and "(1 refused)" in row


# ------------------------------------------------------------------ the label and the pin (sharpfused/_build.py)
def test_local_version_label():
    force = {"SHARPFUSED_FORCE_CUDA": "1"}
    assert _build.local_version(force, "2.11.0+cu130", "13.0") == "torch2.11.cu130"
    assert _build.local_version(force, "2.4.1", "12.4") == "torch2.4.cu124"
    # no FORCE, no extension, or no CUDA: no label (pure wheels and `pip install -e .` stay 0.1.0)
    assert _build.local_version({}, "2.11.0+cu130", "13.0") == ""
    assert _build.local_version(force, "2.11.0+cu130", "13.0", with_extension=False) == ""
    assert _build.local_version(force, "2.13.0+cpu", None) == ""
    # the variable wins, in both directions
    assert _build.local_version({"SHARPFUSED_LOCAL_VERSION": "mine.1"}, "2.11.0", None, False) == "mine.1"
    for off in ("", "none", "None"):
        assert _build.local_version({**force, "SHARPFUSED_LOCAL_VERSION": off}, "2.11.0+cu130", "13.0") == ""
    with pytest.raises(ValueError, match="PEP 440 local version label"):
        _build.local_version({"SHARPFUSED_LOCAL_VERSION": "torch-2.11"}, "2.11.0", None)


def test_torch_requirement_and_tag():
    assert _build.torch_requirement("2.11.0+cu130") == "torch==2.11.*"
    assert _build.torch_requirement("2.4.1") == "torch==2.4.*"
    assert _build.torch_cuda_tag("2.11.0+cu130", "13.0") == "torch2.11.cu130"
    # what the picker reads back from a wheel named with that label
    parts = pw.parse_name(f"sharpfused-0.1.0+{_build.torch_cuda_tag('2.11.0', '13.0')}-cp312-cp312-linux_x86_64.whl")
    assert parts["torch"] == "2.11" and parts["cuda"] == "cu130" and parts["py"] == "cp312"
