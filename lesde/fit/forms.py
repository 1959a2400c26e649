r"""Parametrised impact matrices E(t; theta) for the trajectory-matching fit.

An :class:`ImpactForm` maps a parameter vector theta to E(t), differentiably (torch), for any
batch of times. Two choices make a form:

* ``matrix``: ``"intra_inter"``, ``E = (alpha - beta) I + beta 11^T`` (two free impacts,
  alpha intra-class and beta inter-class), or ``"full"``, all K^2 entries free;
* ``time``: how each free impact depends on t:

  - ``"constant"``: one value;
  - ``"piecewise_linear"``: values at the knots ``tau_0 < ... < tau_{m-1}``, linear in between,
    constant outside;
  - ``"power_law"``: ``a (1 + t/t0)^(-r)`` with a and r free per impact and the time scale t0
    fixed (the form of :class:`lesde.model.PowerLaw`).

Parameter layout: ``theta`` has shape ``(..., P)``; the free impacts are ordered (alpha, beta)
or row-major ``E[c, k]``. Constant: ``P = F`` values; piecewise-linear: ``P = m F``, knot-major
(all free impacts at tau_0 first); power law: ``P = 2 F``, all amplitudes a, then all exponents r.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["ImpactForm"]

_MATRICES = ("intra_inter", "full")
_TIMES = ("constant", "piecewise_linear", "power_law")


class ImpactForm:
    """E(t; theta) for K classes (see the module docstring).

    Parameters
    ----------
    K : number of classes.
    matrix : "intra_inter" (default) or "full".
    time : "constant", "piecewise_linear" (default) or "power_law".
    knots : (m,) increasing knot times of the piecewise-linear form.
    t0 : time scale of the power law (default 1.0, in the units of the log's times).
    """

    def __init__(self, K: int, matrix: str = "intra_inter", time: str = "piecewise_linear",
                 knots: Optional[Sequence[float]] = None, t0: float = 1.0):
        if int(K) != K or K < 2:
            raise ValueError(f"K must be an integer >= 2, got {K}")
        if matrix not in _MATRICES:
            raise ValueError(f"matrix must be one of {', '.join(_MATRICES)}, got {matrix!r}")
        if time not in _TIMES:
            raise ValueError(f"time must be one of {', '.join(_TIMES)}, got {time!r}")
        self.K, self.matrix, self.time = int(K), matrix, time
        self.n_free = 2 if matrix == "intra_inter" else self.K ** 2
        self.knots = None
        if time == "piecewise_linear":
            if knots is None:
                raise ValueError("the piecewise-linear form needs knots")
            kn = np.asarray(knots, dtype=float).ravel()
            if kn.size < 1 or not np.all(np.isfinite(kn)) or np.any(np.diff(kn) <= 0):
                raise ValueError(f"knots must be finite and strictly increasing, got {kn}")
            self.knots = kn
        if not (np.isfinite(t0) and t0 > 0):
            raise ValueError(f"t0 must be positive and finite, got {t0}")
        self.t0 = float(t0)

    # ------------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        if self.time == "constant":
            return self.n_free
        if self.time == "piecewise_linear":
            return self.n_free * self.knots.size
        return 2 * self.n_free

    @property
    def free_names(self) -> list:
        if self.matrix == "intra_inter":
            return ["alpha", "beta"]
        return [f"E[{c},{k}]" for c in range(self.K) for k in range(self.K)]

    @property
    def param_names(self) -> list:
        f = self.free_names
        if self.time == "constant":
            return f
        if self.time == "piecewise_linear":
            return [f"{n}(t={t:g})" for t in self.knots for n in f]
        return [f"a_{n}" for n in f] + [f"r_{n}" for n in f]

    def describe(self) -> dict:
        d = {"matrix": self.matrix, "time": self.time, "K": self.K}
        if self.knots is not None:
            d["knots"] = self.knots.tolist()
        if self.time == "power_law":
            d["t0"] = self.t0
        return d

    def describe_init(self) -> dict:
        """Keyword arguments that rebuild this form."""
        return {"K": self.K, "matrix": self.matrix, "time": self.time,
                "knots": None if self.knots is None else self.knots.copy(), "t0": self.t0}

    def __repr__(self) -> str:
        extra = (f", knots={self.knots.size}" if self.knots is not None else
                 f", t0={self.t0:g}" if self.time == "power_law" else "")
        return f"ImpactForm(K={self.K}, {self.matrix}, {self.time}{extra})"

    # ------------------------------------------------------------------------------------
    def free(self, theta: torch.Tensor, t) -> torch.Tensor:
        """Free impacts at times t: theta (..., P), t (M,) -> (..., M, F)."""
        return FormAt(self, t)(theta)

    def at(self, t) -> "FormAt":
        """The form at fixed times t (M,): a callable theta (..., P) -> free impacts (..., M, F)
        with the interpolation weights precomputed (cheap, and friendly to torch.func)."""
        return FormAt(self, t)

    def matrix_from_free(self, v: torch.Tensor) -> torch.Tensor:
        """(..., F) free impacts -> (..., K, K) impact matrices."""
        K = self.K
        if self.matrix == "full":
            return v.reshape(*v.shape[:-1], K, K)
        eye = torch.eye(K, dtype=v.dtype, device=v.device)
        off = torch.ones(K, K, dtype=v.dtype, device=v.device) - eye
        return v[..., 0, None, None] * eye + v[..., 1, None, None] * off

    def E(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E(t; theta): theta (..., P), t (M,) -> (..., M, K, K)."""
        return self.matrix_from_free(self.free(theta, t))

    # ------------------------------------------------------------------------------------
    def free_numpy(self, theta, t) -> np.ndarray:
        """Free impacts (..., M, F) at times t (M,) for numpy theta (..., P)."""
        th = torch.as_tensor(np.asarray(theta, dtype=float))
        tt = torch.as_tensor(np.atleast_1d(np.asarray(t, dtype=float)))
        return self.free(th, tt).numpy()

    def E_numpy(self, theta, t) -> np.ndarray:
        th = torch.as_tensor(np.asarray(theta, dtype=float))
        tt = torch.as_tensor(np.atleast_1d(np.asarray(t, dtype=float)))
        return self.E(th, tt).numpy()

    def from_constant(self, free_values) -> np.ndarray:
        """Parameters of this form that give the constant free impacts ``free_values`` (F,)."""
        v = np.asarray(free_values, dtype=float).ravel()
        if v.size != self.n_free:
            raise ValueError(f"expected {self.n_free} free impacts, got {v.size}")
        if self.time == "constant":
            return v.copy()
        if self.time == "piecewise_linear":
            return np.tile(v, self.knots.size)
        return np.concatenate([v, np.zeros_like(v)])

    def impacts(self, theta):
        """The fitted E(t) as a :class:`lesde.model.Impacts` for the simulator."""
        from ..model import Constant, Impacts, PowerLaw

        th = np.asarray(theta, dtype=float).copy()
        F = self.n_free
        if self.time == "constant":
            if self.matrix == "intra_inter":
                return Impacts.intra_inter(Constant(th[0], "alpha"), Constant(th[1], "beta"),
                                           self.K)
            return Impacts(th.reshape(self.K, self.K))
        if self.time == "power_law" and self.matrix == "intra_inter":
            return Impacts.intra_inter(PowerLaw(th[0], th[F], self.t0),
                                       PowerLaw(th[1], th[F + 1], self.t0), self.K)
        form = self

        def E_of_t(t):
            return form.E_numpy(th, [float(t)])[0]

        return Impacts(E_of_t)


class FormAt:
    """:meth:`ImpactForm.free` at fixed times, with the time structure precomputed."""

    def __init__(self, form: ImpactForm, t):
        self.form = form
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        tn = np.atleast_1d(np.asarray(t, dtype=float))
        self.M = tn.shape[0]
        self.F = form.n_free
        if form.time == "piecewise_linear":
            kn = form.knots
            m = kn.size
            Bm = np.zeros((self.M, m))
            if m == 1:
                Bm[:, 0] = 1.0
            else:
                idx = np.clip(np.searchsorted(kn, tn, side="right") - 1, 0, m - 2)
                w = np.clip((tn - kn[idx]) / (kn[idx + 1] - kn[idx]), 0.0, 1.0)
                Bm[np.arange(self.M), idx] = 1.0 - w
                Bm[np.arange(self.M), idx + 1] += w
            self.basis = torch.as_tensor(Bm)                                 # (M, m)
        elif form.time == "power_law":
            self.logbase = torch.as_tensor(np.log1p(tn / form.t0)[:, None])  # (M, 1)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        form, F = self.form, self.F
        if form.time == "constant":
            return theta[..., None, :].expand(*theta.shape[:-1], self.M, F)
        if form.time == "power_law":
            a, r = theta[..., :F], theta[..., F:]
            return a[..., None, :] * torch.exp(-r[..., None, :] * self.logbase)
        vals = theta.reshape(*theta.shape[:-1], -1, F)                      # (..., m, F)
        return torch.matmul(self.basis.to(theta.dtype), vals)

    def E(self, theta: torch.Tensor) -> torch.Tensor:
        return self.form.matrix_from_free(self(theta))
