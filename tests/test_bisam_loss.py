"""BiSAM's lower bound: eager version vs the float64 formula; fused Triton kernel (interpreter) vs eager."""

import pytest
import torch

from sharpfused.losses import bisam_lower_bound, bisam_lower_bound_torch

from . import reference as ref
from .helpers import TRITON_DEVICES

VARIANTS = [("log", None, 0.1), ("tanh", None, 0.1), ("log", 3.0, 0.1), ("tanh", 4.0, 0.7)]


def kernel_module():
    try:
        import sharpfused.kernels.bisam_loss as mod
    except Exception as exc:  # pragma: no cover - no triton
        pytest.skip(f"triton kernel unavailable: {exc}")
    return mod


def inputs(n, k, dtype, scale=3.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, k, (n,), generator=g)
    return x.to(device), y.to(device)


def value_and_grad(fn, x, y, reduction="mean"):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, y)
    if reduction == "none":
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device)
        (out * w).sum().backward()
    else:
        out.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("variant,mu,a", VARIANTS)
@pytest.mark.parametrize("k", [1, 2, 7, 37])
def test_torch_version_matches_float64_formula(variant, mu, a, k):
    x, y = inputs(9, k, torch.float64)
    got = bisam_lower_bound(x, y, variant, mu=mu, a=a, reduction="none", backend="torch")
    want = ref.bisam_lower_bound(x, y, variant, mu=mu, a=a)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the label's own term contributes exp(0): Q >= 0 with equality only when every margin term is 0
    assert (got >= -1e-12).all()


def test_gradient_of_float64_formula():
    """Analytic gradient vs finite differences of the float64 formula (both variants)."""
    x, y = inputs(3, 6, torch.float64, scale=1.0)
    for variant in ("log", "tanh"):
        assert torch.autograd.gradcheck(
            lambda t, v=variant: bisam_lower_bound(t, y, v, backend="torch", reduction="none"),
            (x.clone().requires_grad_(True),),
        )


@pytest.mark.parametrize("variant,mu,a", VARIANTS)
@pytest.mark.parametrize("n,k,block", [(5, 1, None), (6, 7, None), (4, 37, None), (3, 301, 64), (0, 5, None)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("device", TRITON_DEVICES)  # cpu under the interpreter, cuda with a GPU
def test_triton_kernel_matches_torch_fp32(variant, mu, a, n, k, block, reduction, device):
    mod = kernel_module()
    x, y = inputs(n, k, torch.float32, device=device)
    mu_ = mu if mu is not None else (1.0 if variant == "log" else 10.0)
    got_v, got_g = value_and_grad(lambda t, yy: mod.BisamLowerBound.apply(t, yy, variant, mu_, a, reduction, block), x, y, reduction)
    want_v, want_g = value_and_grad(
        lambda t, yy: bisam_lower_bound(t, yy, variant, mu=mu, a=a, reduction=reduction, backend="torch"), x, y, reduction
    )
    torch.testing.assert_close(got_v, want_v, rtol=2e-6, atol=2e-6, equal_nan=True)  # n=0: mean is nan
    torch.testing.assert_close(got_g, want_g, rtol=2e-5, atol=1e-6)
    if n:
        # gradients sum to zero per row (Q depends on margins only)
        assert got_g.sum(1).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["log", "tanh"])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_kernel_bf16_within_twice_torch_error(variant, device):
    mod = kernel_module()
    x, y = inputs(8, 37, torch.bfloat16, device=device)
    mu = 1.0 if variant == "log" else 10.0
    got_v, got_g = value_and_grad(lambda t, yy: mod.BisamLowerBound.apply(t, yy, variant, mu, 0.1, "mean", None), x, y)
    tv, tg = value_and_grad(lambda t, yy: bisam_lower_bound(t, yy, variant, backend="torch"), x, y)
    rv, rg = value_and_grad(lambda t, yy: bisam_lower_bound(t, yy, variant, backend="torch"), x.double(), y)
    assert got_g.dtype == torch.bfloat16
    err_k = (got_g.double() - rg).abs().max()
    err_t = (tg.double() - rg).abs().max()
    assert err_k <= 2 * err_t + 1e-7, f"kernel bf16 gradient error {err_k:.3g} vs torch's {err_t:.3g}"
    assert abs(got_v.double() - rv) <= 2 * abs(tv.double() - rv) + 1e-6


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_public_function_uses_kernel_when_asked(device):
    kernel_module()
    x, y = inputs(6, 11, torch.float32, device=device)
    got_v, got_g = value_and_grad(lambda t, yy: bisam_lower_bound(t, yy, "tanh", backend="triton"), x, y)
    want_v, want_g = value_and_grad(lambda t, yy: bisam_lower_bound(t, yy, "tanh", backend="torch"), x, y)
    torch.testing.assert_close(got_g, want_g, rtol=2e-5, atol=1e-6)
    if device != "cpu":
        return
    # auto on CPU is the eager version, bit for bit
    auto_v, auto_g = value_and_grad(lambda t, yy: bisam_lower_bound(t, yy, "tanh"), x, y)
    assert torch.equal(auto_v, want_v) and torch.equal(auto_g, want_g)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kernel_forward_without_grad_and_large_logits(device):
    mod = kernel_module()
    x, y = inputs(4, 40, torch.float32, scale=200.0, device=device)
    loss, dx = mod.bisam_lower_bound_fwd(x, y, "log", 1.0, 0.1, with_grad=False)
    assert dx is None and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, bisam_lower_bound_torch(x, y, "log", 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(variant="hinge"), "variant"),
        (dict(mu=0.0), "mu"),
        (dict(a=-1.0), "a must"),
        (dict(reduction="max"), "reduction"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments(kw, match):
    x, y = inputs(2, 3, torch.float32)
    with pytest.raises(ValueError, match=match):
        bisam_lower_bound(x, y, **kw)
