"""ESAM (Du et al., ICLR 2022): stochastic weight perturbation and sharpness-sensitive data selection."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .base import SharpnessAware, check_rho
from .checks import _host_value

_MASK64 = (1 << 64) - 1


def swp_seed(seed: int, draw: int) -> int:
    """The generator seed of SWP mask number ``draw`` (0, 1, ...) of a run seeded with ``seed``:
    splitmix64 of ``seed + draw * golden``, kept in [0, 2**63). Masks of different draws are
    independent Philox / Mersenne streams, and a resumed run draws the same masks."""
    z = (seed + (draw + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_interval(
    name: str,
    value: Any,
    where: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    meaning: str = "",
) -> Optional[float]:
    """A real number (numpy scalars included) or a 1-element tensor in the interval from ``low`` to
    ``high`` (open at a bound when ``low_open`` / ``high_open``; ``high=inf`` is always open). Returns
    the value as a host float, or None for a device tensor: it is not read back (no host sync), its
    range is the caller's. The message names the parameter and both bounds."""
    rng = _interval(low, high, low_open, high_open or high == math.inf)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name}{where} must be a number in {rng} or a 1-element tensor, got shape {tuple(value.shape)}"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name}{where} must be a real number in {rng}, got a {value.dtype} tensor")
        host = _host_value(value)
        if host is None:
            return None
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}{where} must be a real number in {rng}{meaning}, got {type(value).__name__}")
    else:
        host = value
    v = float(host)
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"{name}{where} must be a finite number in {rng}{meaning}, got {v}")
    return v


def host_setting(name: str, value: Any, low: float, high: float, **kw: Any) -> float:
    """:func:`check_interval` for a global setting the host uses at every step (ESAM's ``gamma``, MESA's
    ``lam`` and ``temperature``): numbers, numpy scalars and 1-element CPU tensors are read once, here;
    a device tensor is refused (reading it would be a host sync)."""
    v = check_interval(name, value, "", low, high, **kw)
    if v is None:
        raise TypeError(
            f"{name} must be a number or a CPU tensor: it is a host setting read at construction, got a tensor "
            f"on {value.device}"
        )
    return v


def refuse_global_in_group(opt: SharpnessAware, group: dict, names: dict[str, str]) -> None:
    """A global setting (``names``: name -> why it is global) given in a param group is refused: it
    would be ignored there."""
    for k, why in names.items():
        if k in group and k not in opt.base_optimizer.defaults:
            index = next((i for i, g in enumerate(opt.param_groups) if g is group), "new")
            raise ValueError(
                f"{k} was given in param group {index}, but it is a global setting of {type(opt).__name__} ({why}): "
                f"pass it to {type(opt).__name__}(..., {k}=...), not in a param group"
            )


def check_beta(name: str, value: Any, where: str) -> None:
    """SWP's keep probability in (0, 1]: a number or a CPU tensor (``bernoulli_`` draws with it as a
    host probability, and ``beta == 1`` draws nothing); a device tensor is refused."""
    v = check_interval(name, value, where, 0.0, 1.0, low_open=True, meaning=" (the fraction of weights perturbed)")
    if v is None:
        raise TypeError(
            f"{name}{where} must be a number or a CPU tensor in (0, 1] (the mask's keep probability is read on the "
            f"host at each step), got a tensor on {value.device}"
        )


def _check_gamma(gamma: Any) -> float:
    return host_setting("gamma", gamma, 0.0, 1.0, low_open=True, meaning=" (the fraction of samples kept by SDS)")


def _check_losses(what: str, losses: Any) -> None:
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"{what} must return the 1-d per-sample losses (reduction='none'), got {shape}")


def sharpness_selection(loss_before: Tensor, loss_after: Tensor, gamma: float) -> Tensor:
    r"""ESAM's sharpness-sensitive data selection (SDS): the samples whose loss rose most.

    ``loss_before``: per-sample losses of the first pass (at :math:`w`); ``loss_after``: the
    same samples' losses at the perturbed weights :math:`w + e` (a forward without gradients,
    between ``first_step()`` and the second pass). The per-sample sharpness is
    :math:`s_i = \ell_i(w + e) - \ell_i(w)`; the selection is the :math:`k = \max(1,
    \lfloor \gamma n \rfloor)` samples with the largest :math:`s_i`, returned as int64 indices
    in ascending order (``x[idx]`` keeps the batch order; ``gamma=1`` returns ``arange(n)``:
    the full batch, in order). On the device: no host sync. The second pass backpropagates the
    mean loss over ``x[idx]``.
    """
    gamma = _check_gamma(gamma)
    for name, t in (("loss_before", loss_before), ("loss_after", loss_after)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-d tensor of per-sample losses (reduction='none'), got "
                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
            )
    if loss_before.shape != loss_after.shape:
        raise ValueError(
            f"loss_before and loss_after must hold the same samples, got shapes {tuple(loss_before.shape)} "
            f"and {tuple(loss_after.shape)}"
        )
    n = loss_before.numel()
    if n == 0:
        raise ValueError("sharpness_selection needs at least one sample")
    k = max(1, int(math.floor(gamma * n + 1e-9)))  # the tolerance keeps 0.29 * 100 at 29
    if k == n:
        return torch.arange(n, device=loss_after.device)
    sharp = loss_after.detach() - loss_before.detach().to(loss_after.device)
    return torch.topk(sharp, k, sorted=False).indices.sort().values


_GLOBAL = {
    "gamma": "one selection of samples per batch",
    "seed": "one mask stream for all parameters",
}


class ESAM(SharpnessAware):
    r"""Efficient SAM (Du et al., "Efficient Sharpness-aware Minimization for Improved Training
    of Neural Networks", ICLR 2022).

    **Stochastic weight perturbation (SWP)**: each step perturbs a random subset of the weights,
    each kept with probability :math:`\beta`, rescaled by :math:`1/\beta` so that the
    perturbation is SAM's in expectation:

    .. math::
        m_i \sim \text{Bernoulli}(\beta),\qquad
        e = \frac{\rho}{\beta}\, m \odot g / (\lVert g \rVert + \epsilon),\qquad
        w \leftarrow \text{restore};\ \text{base step with } \nabla L_{B^+}(w + e)

    The mask is one byte per weight in a scratch flat buffer, drawn on the device with
    ``bernoulli_`` from a generator the optimizer seeds per step (``seed`` and the step count,
    see :func:`swp_seed`): a resumed run (``state_dict``) draws the same masks. The norm is of
    the full gradient (the paper's). ``beta=1`` draws nothing and is SAM exactly.

    **Sharpness-sensitive data selection (SDS)**: the second pass runs on the samples whose loss
    rose most under the perturbation (:func:`sharpness_selection`, ratio ``gamma``). It needs the
    per-sample losses: :meth:`step_sds` takes a ``loss_fn(idx)`` returning them and runs the whole
    step, or by hand with ``first_step()`` / ``second_step()``::

        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.first_step(zero_grad=True)
        with torch.no_grad():
            after = F.cross_entropy(model(x), y, reduction="none")
        idx = opt.select(losses, after)  # sharpness_selection(losses, after, opt.gamma)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.second_step(zero_grad=True)

    ``step(closure)`` runs SAM's two passes with SWP (the full batch in both: no SDS). Passes per
    step with SDS: a forward/backward of the batch, a forward of the batch without gradients, a
    forward/backward of the kept samples.

    ``rho`` and ``beta`` may differ per group; ``gamma`` and ``seed`` are global (refused in a param
    group) and read once, at construction. Hyperparameters are numbers (numpy scalars included) or
    1-element CPU tensors, validated; ``rho`` may also be a device tensor; ``beta`` may not (the
    mask's probability is a host value). The seed and the step count of the masks are host values
    in every ``state_dict`` (``state["esam"]``, from construction on): the count is of the steps
    attempted, except that a skipped first step does not count.
    """

    hyper = {"rho": check_rho, "beta": check_beta}
    m_sharpness = "local"  # only the perturbation uses the first pass (give every replica the same seed)

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        seed: Optional[int] = None,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        self.gamma = _check_gamma(gamma)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # from torch's global (CPU) generator
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        super().__init__(params, base_optimizer, dict(rho=rho, beta=beta), backend, **base_kwargs)

    def _repr_settings(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "seed": self.seed}

    def _check_group(self, group: dict) -> None:
        refuse_global_in_group(self, group, _GLOBAL)
        super()._check_group(group)

    def select(self, loss_before: Tensor, loss_after: Tensor) -> Tensor:
        """:func:`sharpness_selection` with this optimizer's ``gamma``."""
        return sharpness_selection(loss_before, loss_after, self.gamma)

    def step_sds(self, loss_fn: Callable[[Optional[Tensor]], Tensor]) -> Tensor:
        """One ESAM step with SDS. ``loss_fn(idx)`` runs the forward and returns the per-sample losses
        (``reduction="none"``) of the batch (``idx=None``) or of its samples ``idx``, without calling
        backward. Passes: ``loss_fn(None)`` at w (backward of the mean), ``first_step()``,
        ``loss_fn(None)`` at w + e without gradients, :meth:`select`, ``loss_fn(idx)`` (backward of the
        mean), ``second_step()``. Returns the first pass's mean loss (detached); the kept samples' mean
        loss at w + e is in ``last_perturbed_loss``. An exception in a pass aborts the step (weights
        restored, no state moved)."""
        if self._perturbed:
            raise RuntimeError("ESAM.step_sds() between first_step() and second_step(): finish that step first")
        self.zero_grad(set_to_none=True)
        with self.guarded():
            with torch.enable_grad():
                before = loss_fn(None)
                _check_losses("loss_fn(None)", before)
                before.mean().backward()
            self.first_step(zero_grad=True)
            with torch.no_grad():
                after = loss_fn(None)
            idx = self.select(before, after)
            with torch.enable_grad():
                kept = loss_fn(idx)
                _check_losses("loss_fn(idx)", kept)
                kept = kept.mean()
                kept.backward()
            self._run.last_perturbed_loss = kept.detach()
            self.second_step(zero_grad=True)
        return before.detach().mean()

    def _draws(self) -> int:
        st = self.state.get("esam")
        if st is None:
            return 0
        if st.get("seed") != self.seed:  # loaded from a state dict: its seed goes on
            self.seed = int(st["seed"])
        return int(st["draws"])

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen

    def _commit_draw(self, draws: int, skipped: Optional[bool]) -> None:
        if not skipped:  # None (not read on the host): an attempted step counts
            self.state["esam"] = {"seed": self.seed, "draws": draws + 1}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_generators"] = {}  # reseeded at every step: nothing to carry
        return state

    def state_dict(self) -> dict[str, Any]:
        """As the base class, with the masks' seed and step count in ``state["esam"]`` from construction
        on (``draws`` 0 before the first step): a run resumed from any checkpoint draws the same masks."""
        sd = super().state_dict()
        if "esam" not in sd["state"]:
            sd["state"]["esam"] = {"seed": self.seed, "draws": 0}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base class; the seed and step count of the masks come back too."""
        super().load_state_dict(state_dict)
        st = self.state.get("esam")
        if st is not None:
            self.seed = int(st["seed"])
            if int(st["draws"]) == 0:  # taken before the first step: as fresh (a skipped first step leaves no state)
                del self.state["esam"]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w <- w + (rho/beta) m * g/(||g||+eps) with a fresh mask m (after the first backward)."""
        buckets = self._begin_first()
        if buckets:
            draws = self._draws()
            self._commits.append(("_commit_draw", (draws,)))
            # the first step reads the skip flag once, so that a skipped first step leaves no state
            self._run.commit_needs_host = "esam" not in self.state
            inv = self.inverse_norm(self.global_norm(buckets))
            seeded: set = set()
            for b in buckets:
                beta = float(b.group["beta"])
                scale = inv * (b.group["rho"] / beta)
                if beta == 1.0:  # every weight: SAM's perturbation, nothing drawn
                    b.perturb_(b.params, b.grads(), b.backup.views, scale)
                    continue
                gen = self._generator(b.device)
                if b.device not in seeded:  # one seed per step and device; buckets draw in order
                    gen.manual_seed(swp_seed(self.seed, draws))
                    seeded.add(b.device)
                mask = b.buffer("swp_mask", torch.uint8)
                mask.flat.bernoulli_(beta, generator=gen)
                b.perturb_(b.params, b.grads(), b.backup.views, scale, mask=mask.views)
        self._end_first(zero_grad)
