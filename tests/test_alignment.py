"""Kernels stay vectorized on real models: every flat-buffer view starts on a 16-byte boundary, so
the Triton tables of a step (parameters, gradients, backup, saved gradients, masks, base state)
are all aligned and the kernels take their 16-byte path.

Without padding, the backup of an EfficientNet-B0-like bf16 list has 90% of its elements behind
an unaligned view (squeeze-excitation biases of 4-20 elements shift every later offset), and one
such view turns the whole table to 2-byte accesses (kernels/table.py: ALIGNED is per table).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import sharpfused
from sharpfused.buffers import ALIGN_BYTES, FlatBuffer

from .helpers import needs_interpreter
from .test_no_fallback import ALGOS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import shapes as shape_sets  # noqa: E402

LISTS = {"efficientnet-b0": shape_sets.efficientnet_b0, "regnety-400mf": shape_sets.regnety_400mf}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8, torch.bool]


def _raw_misaligned(shapes, dtype) -> int:
    """Elements that would sit behind an unaligned view at raw (unpadded) offsets."""
    size = torch.empty((), dtype=dtype).element_size()
    off = bad = 0
    for s in shapes:
        n = shape_sets.numel([s])
        bad += n if (off * size) % ALIGN_BYTES else 0
        off += n
    return bad


@pytest.mark.parametrize("name", list(LISTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_view_is_16_byte_aligned(name, dtype):
    shapes = LISTS[name]()
    like = [torch.empty(s, dtype=torch.float32, device="meta") for s in shapes]
    buf = FlatBuffer(like, dtype=dtype)
    size = buf.flat.element_size()
    assert buf.flat.device.type == "meta"
    for v, o in zip(buf.views, buf.offsets):
        assert (o * size) % ALIGN_BYTES == 0
        assert v.storage_offset() == o
    gaps = buf.flat.numel() - buf.numel
    assert 0 <= gaps <= len(shapes) * (ALIGN_BYTES // size)
    if size <= 4:  # the lists this test exists for: raw offsets would be misaligned
        assert _raw_misaligned(shapes, dtype) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
def test_real_buffer_addresses_gaps_and_dense_round_trip(dtype):
    shapes = LISTS["efficientnet-b0"]()[:60]
    like = [torch.zeros(s) for s in shapes]
    buf = FlatBuffer(like, dtype=dtype)
    assert all(v.data_ptr() % ALIGN_BYTES == 0 for v in buf.views)
    assert buf.padded and buf.nbytes < (buf.numel + 16 * len(shapes)) * buf.flat.element_size()
    values = (torch.arange(buf.numel) % 7 + 1).to(dtype)
    buf.assign(values)
    assert torch.equal(buf.dense(), values)
    assert torch.equal(torch.cat([v.reshape(-1) for v in buf.views]), values)
    assert int(buf.flat.ne(0).sum()) == buf.numel  # the gaps stayed zero: they belong to no view
    with pytest.raises(ValueError, match="values for"):
        buf.assign(values[:-1])
    # no gap: flat is the dense tensor itself (no copy)
    even = FlatBuffer([torch.zeros(16), torch.zeros(4, 4)], dtype=torch.float32)
    assert not even.padded and even.dense() is even.flat


def _model(shapes, dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


@needs_interpreter
@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize(
    "base,dtype,lst",
    [("sgd", torch.bfloat16, "efficientnet-b0"), ("adamw", torch.float16, "regnety-400mf")],
    ids=["sgd-bf16-effnet", "adamw-fp16-regnet"],
)
def test_every_triton_table_of_a_step_is_aligned(name, base, dtype, lst, monkeypatch):
    from sharpfused.kernels import table as tb

    built = []
    real = tb._build

    def record(lists, device):
        tab = real(lists, device)
        built.append((tab.aligned, [t.data_ptr() % ALIGN_BYTES for lst in lists for t in lst]))
        return tab

    monkeypatch.setattr(tb, "_build", record)
    tb.clear_cache()
    shapes = LISTS[lst]()[:30]  # the small tensors (SE biases) that misalign raw offsets
    params = _model(shapes, dtype)
    cls, kw = (torch.optim.SGD, dict(lr=0.01, momentum=0.9)) if base == "sgd" else (torch.optim.AdamW, dict(lr=1e-3))
    opt = getattr(sharpfused, "SAM" if name == "ASAM" else name)(params, cls, backend="triton", **ALGOS[name], **kw)

    def closure(perturbation=None):
        loss = sum((p.float() * 0.5).square().sum() for p in params)
        loss.backward()
        return loss

    for _ in range(2):  # SSAM's mask refresh, LookSAM's reuse step
        opt.zero_grad()
        opt.step(closure)
    assert built, "no Triton table was built"
    bad = [offs for ok, offs in built if not ok]
    assert not bad, f"{len(bad)} of {len(built)} tables unaligned; address residues {sorted(set(bad[0]))}"
    assert all(torch.isfinite(p.float()).all() for p in params)
