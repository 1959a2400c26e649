"""Plumbing shared by the estimators of :mod:`lesde.fit` (scikit-learn conventions)."""
from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np

BOOTSTRAP_MODES = ("auto", "samples", "trials", "both", "none")


class Estimator:
    """Hyper-parameters in ``__init__`` (listed in ``_params``), ``fit(trajectory)`` returns the
    estimator, results are attributes ending in ``_``; a short ``repr`` that shows only the
    hyper-parameters that differ from their defaults."""

    _params: Sequence[str] = ()

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in self._params}

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        parts = []
        for k, v in self.get_params().items():
            default = sig.parameters[k].default if k in sig.parameters else inspect.Parameter.empty
            try:
                same = default is not inspect.Parameter.empty and bool(np.all(default == v))
            except Exception:       # noqa: BLE001 - objects without a usable ==
                same = default is v
            if not same:
                text = repr(v)
                parts.append(f"{k}={text if len(text) <= 40 else text[:37] + '...'}")
        fitted = ", fitted" if self.is_fitted else ""
        return f"{type(self).__name__}({', '.join(parts)}){fitted}"

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "ts_")

    def _check_level_and_boot(self):
        nb = self.n_bootstrap
        if isinstance(nb, bool) or int(nb) != nb or nb < 0:
            raise ValueError(f"n_bootstrap must be a non-negative integer, got {nb}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")

    def _check_fitted(self):
        if not self.is_fitted:
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(trajectory)")


class ImpactTailIndex:
    """``tail_index`` for estimators with fitted ``ts_``, ``alpha_``, ``beta_``, ``A_``, ``B_``."""

    def tail_index(self, tail=None, which: str = "A", kind: str = "integral", **kwargs) -> dict:
        """Tail index r of the fitted intra- (``which="A"``) or inter-class (``"B"``) impact by
        :func:`~lesde.fit.tail_index` (``kind`` "paper", "integral" or "rate"; keyword
        arguments such as ``time_scale`` go to it)."""
        from .derivatives import tail_index

        self._check_fitted()
        if which not in ("A", "B"):
            raise ValueError(f"which must be 'A' or 'B', got {which!r}")
        if kind == "rate":
            v = self.alpha_ if which == "A" else self.beta_
        else:
            v = self.A_ if which == "A" else self.B_
        return tail_index(self.ts_, v, tail=tail, kind=kind, **kwargs)
