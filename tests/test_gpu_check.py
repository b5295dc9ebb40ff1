"""Where the Triton tests run, and what ``bench/gpu_check.sh`` selects, checked without a GPU.

A GPU machine is simulated in a subprocess by patching ``torch.cuda.is_available`` before
pytest loads tests/conftest.py: the interpreter must then be off (also against an inherited
TRITON_INTERPRET=1), the Triton tests parametrized with ``cuda`` only, the GPU files' tests
marked ``gpu`` (what the GPU check runs with ``-m gpu``), and the tests that need the interpreter
skipped with the reason. The dry run of the check itself is a step of .ci/run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from . import helpers

ROOT = Path(__file__).resolve().parent.parent
GPU_FILES = [
    "test_cuda_backend.py",
    "test_triton_backend.py",
    "test_primitives.py",
    "test_algorithms.py",
    "test_bisam_loss.py",
]

SIMULATE = r"""
import os, sys
import torch
torch.cuda.is_available = lambda: True  # what tests/conftest.py sees on a GPU machine
import pytest

class Grab:
    def pytest_collection_finish(self, session):
        from tests import helpers
        print("ENV", os.environ.get("TRITON_INTERPRET"), "DEVICES", helpers.TRITON_DEVICES)
        for item in session.items:
            print("ITEM", item.nodeid, "gpu" if item.get_closest_marker("gpu") else "-")

sys.exit(pytest.main(["-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rs", *sys.argv[1:]], plugins=[Grab()]))
"""


def simulate_gpu(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # inherited: conftest must turn it off on a GPU machine
    return subprocess.run([sys.executable, "-c", SIMULATE, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_no_gpu_here_means_interpreter_and_cpu_tensors():
    assert not torch.cuda.is_available()
    assert os.environ.get("TRITON_INTERPRET") == "1" and helpers.TRITON_DEVICES == ["cpu"]


def test_gpu_machine_selects_cuda_tests_and_skips_interpreter_ones():
    files = [f"tests/{f}" for f in GPU_FILES]
    out = simulate_gpu("--collect-only", *files)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ENV 0 DEVICES ['cuda']" in out.stdout, out.stdout[:2000]
    items = [tuple(ln[5:].rsplit(" ", 1)) for ln in out.stdout.splitlines() if ln.startswith("ITEM ")]
    gpu = [nid for nid, mark in items if mark == "gpu"]
    for f in GPU_FILES:
        assert any(nid.startswith(f"tests/{f}::") for nid in gpu), f"no GPU test selected in {f}"
    # no Triton test runs on CPU tensors there, every cuda-parametrized test is selected
    tri = [nid for nid, _ in items if nid.startswith("tests/test_triton_backend.py::") and "[" in nid]
    assert tri and not any("cpu" in nid.split("[", 1)[1] for nid in tri), tri[:5]
    unmarked = [nid for nid, mark in items if "[" in nid and "cuda" in nid.split("[", 1)[1] and mark != "gpu"]
    assert not unmarked, unmarked[:5]
    # the CUDA backend's build-decision tests are CPU tests: not in the GPU selection
    assert ("tests/test_cuda_backend.py::test_skip_flag_wins", "-") in items


def test_gpu_machine_skips_cpu_tensor_triton_tests_with_the_reason():
    out = simulate_gpu(
        "tests/test_triton_backend.py::test_resolve_triton_on_cpu_under_interpreter",
        "tests/test_triton_backend.py::test_scalars_are_not_constexpr",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 passed, 1 skipped" in out.stdout, out.stdout[-2000:]
    assert "needs TRITON_INTERPRET=1, which conftest.py sets only where no GPU is visible" in out.stdout
