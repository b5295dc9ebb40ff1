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
