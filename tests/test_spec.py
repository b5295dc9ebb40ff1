"""Every backend, the public functions and the custom ops against the one table of primitive
contracts (sharpfused/spec.py): a new backend is checked by registering it in ops.REGISTRY."""

import inspect

import pytest
import torch

from sharpfused import library, ops
from sharpfused.spec import REQUIRED, SPECS


def _available():
    out = []
    for name in ops.BACKENDS:
        mod = ops._load(name)
        if mod is not None:
            out.append((name, mod))
    return out


def test_torch_backend_is_complete_and_others_loaded_here():
    names = [n for n, _ in _available()]
    assert "torch" in names
    assert set(ops.PRIMITIVES) == set(SPECS)


@pytest.mark.parametrize("backend", [n for n, _ in _available()])
@pytest.mark.parametrize("name", list(SPECS))
def test_backend_function_takes_the_spec_arguments_in_order(backend, name):
    """Positional parameter names equal the spec's; a backend may leave a primitive out (then the
    dispatcher routes it to the torch backend), but not define it with another signature."""
    mod = ops.backend_module(backend)
    fn = getattr(mod, name, None)
    if fn is None:
        assert backend != "torch", f"the torch backend lacks {name}"
        return
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params] == list(SPECS[name].names), f"{backend}.{name}"
    assert all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


@pytest.mark.parametrize("name", list(SPECS))
def test_public_function_signature_from_the_spec(name):
    p = SPECS[name]
    sig = inspect.signature(getattr(ops, name))
    params = list(sig.parameters.values())
    assert [q.name for q in params] == [*p.names, "backend"]
    for a, q in zip(p.args, params):
        assert (q.default is inspect.Parameter.empty) == (a.default is REQUIRED), a.name
        assert (q.kind == q.KEYWORD_ONLY) == a.keyword or (q.kind == q.KEYWORD_ONLY and params.index(q) > 0), a.name
    assert getattr(ops, name).__doc__ == p.doc


@pytest.mark.parametrize("name", list(SPECS))
def test_custom_op_schema_from_the_spec(name):
    p = SPECS[name]
    op = getattr(torch.ops.sharpfused, name).default
    args = op._schema.arguments
    want = []
    for a in p.args:
        want += [a.name, f"{a.name}_t"] if a.kind in ("scalar", "scalar?") else [a.name]
    assert [x.name for x in args] == [*want, "backend"]
    mutated = {x.name for x in args if x.alias_info is not None and x.alias_info.is_write}
    assert mutated == set(p.mutates)
    assert str(op._schema).endswith(library.schema(p).split(") -> ")[1])


def test_byte_models_from_the_spec():
    # bytes counted per list given: perturb_ reads w, g and writes w and the backup
    assert SPECS["perturb_"].bytes({"params": 1, "grads": 1, "backup": 1}) == 4
    assert SPECS["perturb_"].bytes({"params": 1, "grads": 1, "backup": None}) == 3
    sgd = {"params": 1, "backup": 1, "grads": 1, "momentum_buffers": 1}
    assert SPECS["restore_sgd_"].bytes(sgd) == 5
    assert SPECS["restore_sgd_"].bytes({**sgd, "init_momentum": True}) == 4  # a new buffer: written only
    assert SPECS["sq_norm"].bytes({"xs": 1, "weights": 1}) == 2
    assert "traffic" in ops.__doc__ and all(f"``{n}``" in ops.__doc__ for n in SPECS)


def test_dispatcher_refuses_bad_lists_naming_them():
    x = [torch.randn(3)]
    with pytest.raises(ValueError, match="non-empty.*params"):
        ops.restore_([], [])
    with pytest.raises(ValueError, match="differ in length.*params has 1, backup 2"):
        ops.restore_(x, x + x)


def test_mixed_groups_joined_once():
    """Several (device, dtype) groups: each to the backend, results joined by the dispatcher."""
    torch.manual_seed(0)
    xs = [torch.randn(4), torch.randn(3, dtype=torch.float64), torch.randn(5).bfloat16(), torch.randn(2)]
    total, per = ops.sq_norm(xs, per_tensor=True)
    want = torch.stack([x.double().square().sum() for x in xs])
    assert per.dtype == total.dtype == torch.float64
    torch.testing.assert_close(per, want, rtol=1e-2, atol=0)
    torch.testing.assert_close(total, want.sum(), rtol=1e-2, atol=0)
    d = ops.dot_norms(xs, xs)
    assert d.dtype == torch.float64 and d.shape == (3,)
    torch.testing.assert_close(d[0], d[1])
    w = [x.clone() for x in xs]
    ops.combine_(w, xs, 0.5, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(w, xs))


def test_unknown_backend_named():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.resolve("nope", torch.device("cpu"))


def test_docs_byte_table_is_the_spec():
    from pathlib import Path

    from sharpfused import spec

    docs = (Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md").read_text()
    assert spec.markdown() in docs, "docs/benchmarks.md's primitive table differs from sharpfused.spec.markdown()"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert all(f"`{n}`" in readme for n in SPECS), "README's list of primitives misses one"


def test_described_lists_refuse_change_and_grads_are_rescanned():
    """A Tensors list (described once) cannot change; a bucket's gradient list takes device, dtype
    and sizes from the parameters but reads contiguity and addresses anew (a non-contiguous gradient
    goes to the torch backend, counted)."""
    from sharpfused.lists import Tensors, describe

    ps = Tensors([torch.randn(3, 4), torch.randn(5)])
    assert ps.info.dtype == torch.float32 and ps.info.contiguous and ps.info.numels == (12, 5)
    for bad in (lambda: ps.append(torch.randn(1)), lambda: ps.__setitem__(0, torch.randn(1)), ps.clear):
        with pytest.raises(TypeError, match="cannot change"):
            bad()
    g = Tensors.grads_of(ps, [torch.randn(4, 3).t(), torch.randn(5)])
    assert not g.info.contiguous and g.info.ptrs == describe(g).ptrs
    mixed = Tensors([torch.randn(2), torch.randn(2, dtype=torch.float64)])
    assert mixed.info.dtype is None  # heterogeneous: the dispatcher splits it
    total, per = ops.sq_norm(mixed, per_tensor=True)
    assert per.dtype == torch.float64 and per.shape == (2,)
    if ops.unavailable_reason("triton", torch.device("cpu")) is None:
        before = ops.FALLBACKS.copy()
        ops.sq_norm(g, backend="triton")
        assert ops.FALLBACKS - before == {("triton", "sq_norm"): 1}


def test_described_lists_copy_with_a_new_description():
    import copy
    import pickle

    from sharpfused.lists import Tensors

    ps = Tensors([torch.randn(3), torch.randn(2, 2)])
    for other in (copy.deepcopy(ps), pickle.loads(pickle.dumps(ps))):
        assert isinstance(other, Tensors) and all(torch.equal(a, b) for a, b in zip(other, ps))
        assert other.info.ptrs == tuple(t.data_ptr() for t in other) != ps.info.ptrs
    assert copy.copy(ps).info.ptrs == ps.info.ptrs  # a shallow copy holds the same tensors


def test_cuda_backend_signatures_without_the_extension(monkeypatch):
    """The cuda backend's functions against the spec even where sharpfused._C is not built (CPU CI):
    cuda_ops is loaded under another name over a stand-in extension module."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    import sharpfused.backends as backends_pkg

    monkeypatch.setitem(sys.modules, "sharpfused._C", types.ModuleType("sharpfused._C"))
    path = Path(backends_pkg.__file__).parent / "cuda_ops.py"
    spec_ = importlib.util.spec_from_file_location("sharpfused.backends._cuda_ops_signatures", path)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    for name, p in SPECS.items():
        fn = getattr(mod, name, None)
        if fn is None:
            continue  # left to the torch backend by the dispatcher
        assert list(inspect.signature(fn).parameters) == list(p.names), f"cuda_ops.{name}"
    assert callable(mod.supports)


def test_dispatcher_checks_the_contract_naming_the_argument():
    """An outside trial's odd calls: each refused with the argument named (they broadcast, divided by
    zero or failed deep inside a backend before)."""
    x = [torch.zeros(3)]
    with pytest.raises(ValueError, match="restore_: parallel lists differ at tensor 0: params has 3 elements, backup 1"):
        ops.restore_(x, [torch.tensor([7.0])])
    with pytest.raises(ValueError, match="dot_norms: parallel lists differ at tensor 0"):
        ops.dot_norms([torch.ones(3)], [torch.ones(1)])
    with pytest.raises(TypeError, match="sq_norm: xs must be a list \\(or tuple\\) of tensors, got Tensor"):
        ops.sq_norm(torch.ones(3))
    w, b, g = [torch.zeros(2)], [torch.ones(2)], [torch.ones(2)]
    with pytest.raises(ValueError, match="momentum_buffers must be a list of tensors when momentum is nonzero"):
        ops.restore_rmsprop_(w, b, g, [torch.ones(2)], None, lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.9)
    with pytest.raises(ValueError, match="momentum_buffers must be a list of tensors when momentum is nonzero"):
        ops.restore_sgd_(w, b, g, None, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                         init_momentum=False)  # fmt: skip
    with pytest.raises(ValueError, match="restore_adamw_: step must be >= 1, got 0"):
        ops.restore_adamw_(w, b, g, [torch.zeros(2)], [torch.zeros(2)], step=0, lr=0.1, beta1=0.9, beta2=0.99,
                           eps=1e-8, weight_decay=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="perturb_: norm_sq must be a one-element tensor, got shape \\(2,\\)"):
        ops.perturb_(w, g, None, 0.05, norm_sq=torch.ones(2))
    with pytest.raises(TypeError, match="perturb_: norm_sq must be None or a 0-d tensor, got float"):
        ops.perturb_(w, g, None, 0.05, norm_sq=4.0)
    for bad in (torch.tensor(True), torch.tensor(4.0 + 0j)):
        with pytest.raises(TypeError, match="perturb_: norm_sq must be a real number .*, got torch.(bool|complex64)"):
            ops.perturb_(w, g, None, 0.05, norm_sq=bad)
    with pytest.raises(ValueError, match="restore_sgd_: found_inf must be a one-element tensor, got shape \\(0,\\)"):
        ops.restore_sgd_(
            w, b, g, None, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
            init_momentum=False, found_inf=torch.zeros(0),
        )  # fmt: skip
    with pytest.raises(TypeError, match="found_inf must be None or a 0-d tensor, got bool"):
        ops.restore_sgd_(
            w, b, g, None, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
            init_momentum=False, found_inf=True,
        )  # fmt: skip


def test_triton_on_cpu_without_the_interpreter_is_refused_by_name():
    import subprocess
    import sys

    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import torch\nfrom sharpfused import ops\n"
        "try:\n    ops.sq_norm([torch.ones(3)], backend='triton')\n"
        "except ValueError as e:\n    print('refused:', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "refused: sq_norm(backend='triton') on cpu: backend 'triton' runs on CUDA tensors only" in out.stdout, out


def test_combine_with_saved_aliasing_g():
    """combine_(g, g, c1, c2) is (c1 + c2) g on every backend (the torch backend scaled g in place
    before reading it as saved)."""
    for backend in [b for b in ("torch", "triton") if ops.unavailable_reason(b, torch.device("cpu")) is None]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            g = [torch.tensor([1.0, 2.0, 3.0], dtype=dtype)]
            ops.combine_(g, g, 1.5, 0.5, backend=backend)
            assert torch.equal(g[0], torch.tensor([2.0, 4.0, 6.0], dtype=dtype)), (backend, dtype)
            g = [torch.tensor([1.0, float("inf")], dtype=dtype)]
            ops.combine_(g, g, 0.0, 1.0, backend=backend)  # the zero coefficient drops its term
            assert torch.equal(g[0], torch.tensor([1.0, float("inf")], dtype=dtype)), (backend, dtype)
