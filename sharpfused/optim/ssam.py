"""Sparse SAM (Mi et al., NeurIPS 2022): perturb only a masked fraction of the weights."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch

from .base import SharpnessAware, check_rho, check_unit

MASKS = ("fisher", "random")


class SSAM(SharpnessAware):
    r"""Sparse SAM (Mi et al., "Make Sharpness-Aware Minimization Stronger: A Sparsified
    Perturbation Approach", NeurIPS 2022).

    .. math::
        e = m \odot \rho\, g / (\lVert g \rVert + \epsilon), \qquad
        g_s = \nabla L(w + e),\qquad w \leftarrow \text{restore};\ \text{base step with } g_s

    The binary mask :math:`m` keeps a fraction ``1 - sparsity`` of each group's weights (a
    global top-k over the group's parameters) and is one byte per weight in a flat buffer,
    passed to ``perturb_``'s ``mask``:

    * ``mask="fisher"`` (SSAM-F): the entries with the largest empirical Fisher score
      :math:`g \odot g`, from the first-pass gradient of the step that refreshes the mask (the
      authors average :math:`g^2` over a few samples; here: the mini-batch gradient).
    * ``mask="random"``: a uniformly random subset (``torch.rand``, the global generator).

    The mask is computed at the first step and refreshed every ``mask_every`` steps (the
    authors refresh every few epochs); the refresh is a top-k over the group, the only
    non-fused work, outside the other steps. ``sparsity=0`` is SAM. ``rho`` and ``sparsity``
    may differ per group. The mask and the step counter are in ``state_dict``.

    Protocol: SAM's (``first_step``/``second_step`` or ``step(closure)``).
    """

    hyper = {"rho": check_rho, "sparsity": check_unit}
    m_sharpness = "averaged"  # the mask's scores: +1 all-reduce of 1x params (fp32) per refresh

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.05,
        sparsity: float = 0.5,
        mask: str = "fisher",
        mask_every: int = 1000,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        if mask not in MASKS:
            raise ValueError(f"mask must be 'fisher' or 'random', got {mask!r}")
        if isinstance(mask_every, bool) or not isinstance(mask_every, int) or mask_every < 1:
            raise ValueError(f"mask_every must be an integer >= 1 (steps between mask refreshes), got {mask_every!r}")
        self.mask_kind, self.mask_every = mask, mask_every
        super().__init__(params, base_optimizer, dict(rho=rho, sparsity=sparsity), backend, **base_kwargs)

    def _repr_settings(self) -> dict[str, Any]:
        return {"mask": self.mask_kind, "mask_every": self.mask_every}

    @torch.no_grad()
    def refresh_mask(self) -> None:
        """Recompute the mask now from the gradients in ``.grad`` (``first_step`` calls this on schedule).

        Called by hand outside a step, a non-finite gradient keeps the mask it had. Inside a step the
        new mask is used at once and kept only when the step completes (see ``first_step``).
        """
        self._refresh(self.buckets(), keep_on_nonfinite=True)
        self.state["ssam"] = {"since_refresh": 0}

    def _refresh(self, buckets: list, keep_on_nonfinite: bool) -> list:
        """Write the new masks; returns (mask buffer, old flat values or None when new) per group."""
        by_group: dict[int, list] = {}
        for b in buckets:
            by_group.setdefault(b.group_index, []).append(b)
        saved = []
        for group_buckets in by_group.values():
            got = [self.state_buffer(b, "mask", torch.uint8) for b in group_buckets]
            masks, valid = [m for m, _ in got], all(v for _, v in got)
            dev = masks[0].flat.device
            if self.mask_kind == "fisher":
                score = torch.cat(
                    [torch.cat([g.reshape(-1) for g in b.grads()]).float().square().to(dev) for b in group_buckets]
                )
            else:
                score = torch.rand(sum(m.numel for m in masks), device=dev)
            self.average_local(group_buckets, tensors=[score])  # m-sharpness: one mask for every replica
            keep = round((1.0 - group_buckets[0].group["sparsity"]) * score.numel())
            flat = torch.zeros(score.numel(), dtype=torch.uint8, device=dev)
            flat[torch.topk(score, keep, sorted=False).indices] = 1
            old = torch.cat([m.dense() for m in masks]) if valid else None
            if valid and keep_on_nonfinite:  # decided on the device
                flat = torch.where(torch.isfinite(score).all(), flat, old)
            self._write_masks(masks, flat)
            saved.append((masks, old))
        return saved

    @staticmethod
    def _write_masks(masks: list, flat: torch.Tensor) -> None:
        """A group's mask, one flat tensor over its buckets, into their mask buffers."""
        for m, part in zip(masks, flat.split([m.numel for m in masks])):
            m.assign(part)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base class; masks come back as uint8 (torch's loader casts state to the parameter dtype)."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            mask = st.get("mask") if isinstance(st, dict) else None
            if isinstance(mask, torch.Tensor) and mask.dtype != torch.uint8:
                st["mask"] = mask.to(torch.uint8)

    @classmethod
    def _undo_refresh(cls, saved: list) -> None:
        for masks, old in saved:
            if old is not None:
                cls._write_masks(masks, old)

    def _commit_refresh(self, saved: list, refresh: bool, since: Optional[int], skipped: Optional[bool]) -> None:
        if refresh and skipped:
            self._undo_refresh(saved)  # new masks (state created by this step) are dropped by _finish_step
            return
        self.state["ssam"] = {"since_refresh": 1 if refresh else since + 1}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb the masked weights: w <- w + m * rho g/(||g||+eps) (after the first backward).

        A refresh is committed when its step completes: on a skipped or aborted refresh step the
        old mask comes back and the refresh is due again at the next step (the first finite step
        builds the first mask). The steps-since-refresh counter is a host value: it counts the
        steps attempted between refreshes.
        """
        buckets = self._begin_first()
        if buckets:
            valid = all([self.state_buffer(b, "mask", torch.uint8)[1] for b in buckets])
            since = self.state.get("ssam", {}).get("since_refresh")
            refresh = not valid or since is None or since >= self.mask_every
            saved = self._refresh(buckets, keep_on_nonfinite=False) if refresh else []

            self._rollbacks.append(("_undo_refresh", (saved,)))
            self._commits.append(("_commit_refresh", (saved, refresh, since)))
            self._run.commit_needs_host = refresh  # one host read on refresh steps only
            inv = self.inverse_norm(self.global_norm(buckets))
            for b in buckets:
                scale = inv * b.group["rho"]
                mask = b.extra["mask"].views
                b.perturb_(b.params, b.grads(), b.backup.views, scale, mask=mask)
        self._end_first(zero_grad)
