import os

import torch

# Where the Triton kernels run is decided here, before anything imports triton (importing torch
# first is fine: it does not import triton). With no GPU visible (CI) they run on CPU tensors
# under the interpreter. With a GPU they run compiled on CUDA tensors and the interpreter stays
# off, also against an inherited TRITON_INTERPRET=1: under it a kernel given a CUDA table reads
# device addresses as host pointers and the process segfaults. tests/helpers.py: TRITON_DEVICES.
# (CUDA_VISIBLE_DEVICES= hides the GPU: the CPU flow, interpreter on, on a GPU machine.)
_GPU = torch.cuda.is_available()
if _GPU:
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu: needs a CUDA device (set on tests parametrized with a cuda device and on the cuda backend's "
        "tests; bench/gpu_check.sh runs `pytest -m gpu`)",
    )


def pytest_report_header(config):
    return (
        f"sharpfused tests: GPU visible: {_GPU}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} "
        f"(Triton kernels on {'CUDA tensors, compiled' if _GPU else 'CPU tensors, interpreted'})"
    )


def _is_cuda(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_is_cuda(v) for v in value)
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def _needs_gpu(item) -> bool:
    if item.get_closest_marker("gpu") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda(v) for v in callspec.params.values()):
        return True
    # a module's own GPU mark (test_cuda_backend.py: gpu = pytest.mark.skipif(<no usable CUDA backend>))
    mod_mark = getattr(getattr(item, "module", None), "gpu", None)
    if isinstance(mod_mark, pytest.MarkDecorator):
        return any(m == mod_mark.mark for m in item.iter_markers(mod_mark.name))
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _needs_gpu(item):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
