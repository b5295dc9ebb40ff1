"""Small shared test utilities: random tensor lists, error measures, tiny models."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from torch import nn

# Where the Triton kernels run in this process (tests/conftest.py chose before triton was
# imported): CPU tensors under the interpreter when no GPU is visible, compiled on CUDA tensors
# when one is. Never both: the interpreter reads a CUDA table's device addresses as host pointers.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICES = ["cpu"] if TRITON_INTERPRET else (["cuda"] if torch.cuda.is_available() else [])
needs_interpreter = pytest.mark.skipif(
    not TRITON_INTERPRET,
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1, which conftest.py sets only where no GPU is visible",
)

ODD_SIZES = [(1,), (7,), (0,), (33, 5), (4099,), (3, 0, 2), (17, 3, 3)]


def rand_list(shapes, dtype=torch.float32, device="cpu", scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype).to(device) for s in shapes]


def _tensors(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| over a tensor or a list/tuple of tensors, as one vector, in float64.

    The one relative-error measure of the test suite. Each tensor is detached and upcast to float64
    on the CPU; the sums of squares accumulate in float64. It refuses (AssertionError) what would
    otherwise give a number that compares misleadingly:

    * ``out`` and ``ref`` of different lengths or a pair of different shapes (no silent ``zip``
      truncation, no broadcasting);
    * a NaN or inf in ``out`` or ``ref`` (an inf error would pass ``e <= 2 * e_torch`` when the
      other result overflowed too, and a NaN fails every comparison with an unhelpful message).

    An all-zero ``ref`` gives 0.0 when ``out`` is exactly zero too and inf otherwise: no clamp of
    the denominator, which would turn the relative measure into a scaled absolute one.
    """
    out, ref = _tensors(out), _tensors(ref)
    assert len(out) == len(ref), f"rel_err: {len(out)} tensors vs {len(ref)} in the reference"
    num = den = torch.zeros((), dtype=torch.float64)
    for i, (o, r) in enumerate(zip(out, ref)):
        o = torch.as_tensor(o).detach().to("cpu", torch.float64)
        r = torch.as_tensor(r).detach().to("cpu", torch.float64)
        assert o.shape == r.shape, f"rel_err: tensor {i} has shape {tuple(o.shape)}, reference {tuple(r.shape)}"
        assert torch.isfinite(o).all(), f"rel_err: tensor {i} has a non-finite value"
        assert torch.isfinite(r).all(), f"rel_err: reference tensor {i} has a non-finite value"
        num = num + ((o - r) ** 2).sum()
        den = den + (r**2).sum()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return float((num / den).sqrt())


# The floor of the 2x rule, by the dtype of the tested result. It only matters where the torch
# backend's own error is ~0, i.e. a result rounded once to its dtype from a computation in wider
# precision (fp32 sums of low-precision tensors, fp32/fp64 updates): a few units of that dtype's
# rounding (4 eps; fp32 4.8e-7, fp64 8.9e-16). A bf16/fp16 result gets none: the torch backend's
# error there is many bf16/fp16 roundings, and 2x of it is the whole allowance.
TORCH_ERROR_FLOOR = {
    torch.float64: 4 * torch.finfo(torch.float64).eps,
    torch.float32: 4 * torch.finfo(torch.float32).eps,
    torch.bfloat16: 0.0,
    torch.float16: 0.0,
}


def assert_within_torch_error(got, torch_result, ref, factor: float = 2.0, floor: float | None = None,
                              what: str = "") -> tuple[float, float]:
    """The error rule of the design: sharpfused's result errs against the float64 reference ``ref``
    at most ``factor`` (2x) as much as the torch/eager implementation's ``torch_result`` does, plus
    ``floor`` (default: TORCH_ERROR_FLOOR of ``got``'s dtype; the smallest one when a list mixes
    dtypes). Errors are ``rel_err``. Returns (sharpfused's error, torch's error)."""
    if floor is None:
        floor = min(TORCH_ERROR_FLOOR[t.dtype] for t in _tensors(got))
    e, e_torch = rel_err(got, ref), rel_err(torch_result, ref)
    assert e <= factor * e_torch + floor, (
        f"{what}: error {e:.3g} > {factor:g} x torch's {e_torch:.3g} + {floor:.2g}".lstrip(": ")
    )
    return e, e_torch


def first_mismatch(a, b) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if not torch.equal(x, y):
            idx = (x != y).nonzero()[:3].tolist()
            return f"tensor {i} differs at {idx}: {x.flatten()[:3].tolist()} vs {y.flatten()[:3].tolist()}"
    return "equal"


class MLP(nn.Module):
    def __init__(self, d_in=10, d_hidden=16, d_out=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))

    def forward(self, x):
        return self.net(x)


class ConvBN(nn.Module):
    def __init__(self, c=4, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c * 6 * 6, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def data(model_kind: str, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    if model_kind == "mlp":
        return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _gloo_main(rank, port, nprocs, body, out_dir, args):
    """One rank: a gloo process group on the loopback port, ``body(rank, *args)``, its result saved."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=nprocs)
    try:
        out = body(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def run_gloo(body, out_dir, *args, nprocs: int = 2) -> list:
    """Run ``body(rank, *args)`` (a module-level function) in ``nprocs`` processes of one gloo group
    and return each rank's result. A free loopback port; once more on a fresh port when the
    rendezvous lost its port to another process (a race, not a test failure), or when a rank died
    of a signal without a Python error (gloo's C++ runtime aborting, "terminate called without an
    active exception": seen once in 4 CI runs, not reproduced in 10 local runs); a test's own failure
    (an exception in a rank) is never retried, and a second crash fails the test."""
    import os

    import torch.multiprocessing as mp

    for attempt in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_gloo_main, args=(port, nprocs, body, str(out_dir), args), nprocs=nprocs, join=True)
            break
        except mp.ProcessRaisedException as e:
            text = str(e)
            if attempt or not any(w in text for w in ("Address already in use", "EADDRINUSE", "Connection refused")):
                raise
        except mp.ProcessExitedException as e:
            if attempt or e.signal_name is None:
                raise
            import warnings

            warnings.warn(f"run_gloo: a rank died of {e.signal_name} without a Python error; running once more")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]


def optimizer_snapshot(model, opt) -> list:
    """The weights, then every (entry, value) of the base optimizer's and the algorithm's state in a
    fixed order (tensors cloned): compare two of them with ``==`` on values / torch.equal."""
    out = [p.detach().clone() for p in model.parameters()]
    names = {id(p): n for n, p in model.named_parameters()}
    for st in (opt.base_optimizer.state, opt.state):
        for key in sorted(st, key=lambda k: names.get(id(k), str(k))):
            for entry in sorted(st[key]):
                v = st[key][entry]
                out.append((entry, v.detach().clone() if isinstance(v, torch.Tensor) else v))
    return out


def same_values(a, b) -> bool:
    """Equal bit for bit: tensors by shape and torch.equal, lists/tuples/dicts element by element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    return a == b
