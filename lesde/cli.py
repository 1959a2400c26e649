"""The ``lesde`` command line: one subcommand per main job.

Each subcommand is a pair ``_add_<name>(sub)`` (its argparse parser) and ``_run_<name>(args)``
(its work). Heavy modules are imported inside the ``_run_`` functions so that ``lesde --help``
stays fast. Nothing in the package imports this module.
"""
from __future__ import annotations

import argparse
import re
import sys


_SUBCOMMANDS = []  # (name, add-function) in the order shown by --help


def _subcommand(add):
    """Register ``_add_<name>`` as a subcommand parser builder."""
    _SUBCOMMANDS.append((add.__name__[len("_add_"):], add))
    return add


def _threads(args) -> None:
    if getattr(args, "threads", None) is not None:
        _check_args(args, threads="pos_int")
        import torch

        torch.set_num_threads(int(args.threads))


_RULES = {
    "pos_int": ("a positive integer", lambda v: float(v) == int(v) and v >= 1),
    "nonneg_int": ("a non-negative integer", lambda v: float(v) == int(v) and v >= 0),
    "pos_float": ("positive (and finite)", lambda v: v > 0 and v < float("inf")),
    "nonneg_float": ("non-negative (and finite)", lambda v: v >= 0 and v < float("inf")),
    "finite": ("a finite number", lambda v: abs(v) < float("inf")),
    "fraction": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
}


def _check_args(args, **rules) -> None:
    """``rules``: argument name -> one of _RULES; None values are skipped. A value breaking its
    rule is a ValueError naming the option (one line and exit status 2 from main)."""
    import numpy as np

    for name, rule in rules.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        text, ok = _RULES[rule]
        values = np.atleast_1d(np.asarray(value, dtype=float))
        try:
            good = all(bool(ok(float(v))) for v in values)
        except (ValueError, OverflowError):
            good = False
        if not good:
            shown = value if np.ndim(value) == 0 else ",".join(f"{v:g}" for v in values)
            raise ValueError(f"--{name.replace('_', '-')} must be {text}, got {shown}")


def _check_out(path, option: str, directory: bool = False) -> None:
    """The output path of an option can be written (checked before any work)."""
    from .storage import check_output_path

    check_output_path(path, option, directory=directory)


# --------------------------------------------------------------------------------------------
# the parser core: defaults in the help, negative numbers as values, options where users type
# them (every subcommand's parser is a _Parser)
# --------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (unless its help already mentions one); an option without
    help text still shows its default."""

    @staticmethod
    def _default_text(action):
        """The default to show, or None."""
        d = getattr(action, "_lesde_default", action.default)
        if (not action.option_strings or action.nargs == 0 or d is None or d is False
                or d is argparse.SUPPRESS or (isinstance(d, (list, tuple)) and not d)):
            return None
        if isinstance(d, (list, tuple)):
            d = " ".join(str(v) for v in d)
        return str(d).replace("%", "%%")

    def _get_help_string(self, action):
        text = action.help or ""
        shown = self._default_text(action)
        if shown is not None and "default" not in text.lower():
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
        return text

    def _format_action(self, action):
        shown = self._default_text(action)
        if not action.help and shown is not None:
            import copy

            action = copy.copy(action)
            action.help = f"default: {shown}"
        return super()._format_action(action)


# a value that starts with '-' but is a number, a comma list or a START:STOP:COUNT range
_NEGATIVE_VALUE = re.compile(r"^-(?:\d|\.\d|inf\b|nan\b)[\w.+\-:,]*$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse with three conveniences, for every subcommand alike:

    * option help shows the default (:class:`_HelpFormatter`);
    * a value that looks like a negative number, list or range (``--gap -0.3:0.3:3``,
      ``--alpha -1,0.5``) is taken as the option's value, not as an unknown option;
    * options of a command are also accepted after its sub-job (``lesde elasticity torus
      --out DIR``): :func:`_propagate_options` copies them into the sub-job parsers.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def _join_negative_values(self, args):
        out, i = [], 0
        while i < len(args):
            a = args[i]
            if a == "--":
                out.extend(args[i:])
                break
            action = self._option_string_actions.get(a)
            if (action is not None and action.nargs in (None, "?") and i + 1 < len(args)
                    and isinstance(args[i + 1], str) and _NEGATIVE_VALUE.match(args[i + 1])):
                out.append(f"{a}={args[i + 1]}")
                i += 2
                continue
            out.append(a)
            i += 1
        return out

    def parse_known_args(self, args=None, namespace=None):
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args(self._join_negative_values(list(args)), namespace)


def _subparsers_of(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _propagate_options(parser) -> None:
    """Copy the options of every command that has sub-jobs into each sub-job's parser (with
    no default of their own, so the command's value stands unless given after the job name),
    recursively, so they are accepted on either side of the job name."""
    sub = _subparsers_of(parser)
    if sub is None:
        return
    import copy

    own = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    for child in dict.fromkeys(sub.choices.values()):
        group = None
        for action in own:
            if any(s in child._option_string_actions for s in action.option_strings):
                continue  # the sub-job has its own option of that name
            if group is None:
                group = child.add_argument_group(f"options of `{parser.prog}` (also accepted here)")
            shared = copy.copy(action)
            shared._lesde_default = action.default  # shown in the help
            shared.default = argparse.SUPPRESS
            shared.required = False
            group._add_action(shared)
        _propagate_options(child)


# --------------------------------------------------------------------------------------------
# subcommands (engine)
# --------------------------------------------------------------------------------------------
# [engine subcommands are added here]

def _floats(text: str):
    """'0.5' -> 0.5; '0.2,0.5,1' -> array (batched parameter)."""
    import numpy as np

    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list of numbers, "
                                         f"got {text!r}")
    return vals[0] if len(vals) == 1 else np.array(vals)


def _add_model_args(p, K=3, n=50, T=400.0, dt=0.5, noise="sgd", lr=1.0, sigma=0.0):
    g = p.add_argument_group("model")
    g.add_argument("--K", type=int, default=K, help="number of classes (default %(default)s)")
    g.add_argument("--n", type=int, default=n, help="samples per class (default %(default)s)")
    g.add_argument("--p", type=int, default=None, help="feature dimension (default K)")
    g.add_argument("--alpha", type=_floats, default=1.0, help="intra-class impact; a comma list runs a batch")
    g.add_argument("--beta", type=_floats, default=0.2, help="inter-class impact; a comma list runs a batch")
    g.add_argument("--drift", default="cross_entropy", choices=["identity", "label_projection", "cross_entropy"],
                   help="drift field G: identity (I-model), label_projection (L-model) or "
                   "cross_entropy (features are logits, p = K)")
    g.add_argument("--noise", default=noise, choices=["additive", "sgd", "both", "none"],
                   help="diffusion: additive sigma dW, SGD sampling noise with learning rate --lr, or both")
    g.add_argument("--lr", type=float, default=lr, help="learning rate h of the SGD noise (default %(default)s)")
    g.add_argument("--sigma", type=_floats, default=sigma, help="additive noise level (default %(default)s)")
    g.add_argument("--init-std", type=float, default=0.5, help="X(0) ~ N(0, init_std^2 I) (default %(default)s)")
    s = p.add_argument_group("solver")
    s.add_argument("--T", type=float, default=T, help="final time (default %(default)s)")
    s.add_argument("--dt", type=float, default=dt, help="step size (default %(default)s)")
    s.add_argument("--saves", type=int, default=41, help="number of save times (default %(default)s)")
    s.add_argument("--runs", type=int, default=1, help="independent runs per parameter point")
    s.add_argument("--backend", default="native", choices=["native", "torchsde"],
                   help="native: lesde's batched O(N p) solver; torchsde: torchsde.sdeint (for its methods)")
    s.add_argument("--method", default="euler",
                   help="euler (default); exact (identity / label_projection drift with additive noise: "
                   "exact sampling at the save times, no steps); or a torchsde method with --backend torchsde")
    s.add_argument("--increments", default="gaussian", choices=["gaussian", "rademacher"],
                   help="Brownian increments of the native Euler scheme: gaussian, or rademacher "
                   "(two-point +-sqrt(dt): weak order 1, cheaper, not Brownian paths)")
    s.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                   help="floating-point precision of the simulation")
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    s.add_argument("--seed", type=int, default=0, help="random seed (initial state uses seed + 1)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _build_sde(args):
    import numpy as np

    from .model import LESDE, Impacts

    y = np.repeat(np.arange(args.K), args.n)
    return LESDE(y, Impacts.intra_inter(args.alpha, args.beta, args.K), args.drift, sigma=args.sigma,
                 noise=args.noise, lr=args.lr if args.noise in ("sgd", "both") else None, dim=args.p)


def _check_model_args(args) -> None:
    """Validate the model and solver options before any work (each error names its option)."""
    import numpy as np

    _check_args(args, K="pos_int", n="pos_int", p="pos_int", saves="pos_int", runs="pos_int",
                seed="nonneg_int", T="pos_float", dt="pos_float", lr="pos_float",
                init_std="nonneg_float", alpha="finite", beta="finite", sigma="nonneg_float")
    if args.saves < 2:
        raise ValueError(f"--saves must be at least 2 (the initial and the final time), got {args.saves}")
    from .resources import check_device

    check_device(args.device, "--device")
    B = 1
    for name in ("alpha", "beta", "sigma"):
        B = max(B, int(np.size(getattr(args, name))))
    B *= args.runs
    from .solvers import _check_simulation_memory
    import torch

    p = args.p if args.p is not None else args.K
    _check_simulation_memory(B, args.K * args.n, p, args.K, args.saves, getattr(args, "record", "full"),
                             getattr(torch, args.dtype), args.noise in ("sgd", "both"), args.device)


def _simulate_from_args(args, record="full"):
    import numpy as np
    import torch

    from .solvers import initial_state, simulate

    _check_model_args(args)
    sde = _build_sde(args)
    B = (sde.param_batch or 1) * args.runs
    dtype = getattr(torch, args.dtype)
    x0 = initial_state(B, sde.N, sde.p, std=args.init_std, seed=args.seed + 1, dtype=dtype, device=args.device)
    if sde.param_batch and sde.param_batch > 1 and args.runs > 1:
        raise ValueError("batched alpha/beta/sigma with --runs > 1: give one or the other")
    ts = np.linspace(0.0, args.T, max(2, args.saves))
    return sde, simulate(sde, x0, ts, args.dt, backend=args.backend, method=args.method, seed=args.seed,
                         record=record, dtype=dtype, device=args.device, progress=not args.no_progress,
                         increments=args.increments)


def _summary_lines(sde, sol):
    import numpy as np

    from . import metrics

    X = sol.states[-1]
    y = sol.labels
    lines = []
    ok = ~sol.overflowed
    if sde.p == sde.K and ok.any():
        loss = np.asarray(metrics.cross_entropy(X[ok], y))
        acc = np.asarray(metrics.argmax_accuracy(X[ok], y))
        lines.append(f"final training cross-entropy of the logits: {np.array2string(loss, precision=4)}")
        lines.append(f"final argmax accuracy of the logits:         {np.array2string(acc, precision=3)}")
    if ok.any():
        ncc = np.asarray(metrics.ncc_accuracy(X[ok], y))
        lines.append(f"final nearest-class-centre accuracy:         {np.array2string(ncc, precision=3)}")
    if sol.overflowed.any():
        lines.append(f"overflowed runs (stopped): {np.flatnonzero(sol.overflowed).tolist()} at t = "
                     f"{np.array2string(sol.overflow_time[sol.overflowed], precision=4)}")
    return lines


@_subcommand
def _add_simulate(sub):
    p = sub.add_parser("simulate", help="simulate the LE-SDE and write a solution file (.npz)",
                       description="Simulate dX_j = (1/N) sum_j' E[y_j, y_j'] G(X_j') dt + noise with "
                       "E = (alpha - beta) I + beta 11^T, balanced classes, X(0) Gaussian.")
    _add_model_args(p)
    p.add_argument("--record", default="full", choices=["full", "summary"],
                   help="full: every sample's features at each save time; summary: class means and "
                   "within-class covariances only (memory O(K p^2) instead of O(N p))")
    p.add_argument("-o", "--output", default="lesde_solution.npz", help="solution file (default %(default)s)")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args):
    import os

    _check_out(args.output, "-o/--output")
    sde, sol = _simulate_from_args(args, record=args.record)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    args.output = sol.save(args.output)
    scheme = ("exact sampling" if args.method == "exact" else
              f"dt = {args.dt:g}" + (", two-point increments" if args.increments == "rademacher" else ""))
    print(f"simulated {sol.num_runs} run(s): N = {sde.N}, K = {sde.K}, p = {sde.p}, {args.drift} drift, "
          f"{args.noise} noise, T = {args.T:g}, {scheme} ({sol.params['wall_seconds']:.2f} s)")
    if sol.states is not None:
        for line in _summary_lines(sde, sol):
            print(line)
    print(f"wrote {args.output}")


# --------------------------------------------------------------------------------------------
# figure commands: where they write, what they refuse to replace
# --------------------------------------------------------------------------------------------
#: default folder of every figure command (relative to the working directory)
_FIG_DIR = "lesde_figures"
_FIG_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "tif", "tiff", "eps", "ps", "webp")
_WROTE = []  # paths written by the current command, in order (for `figures all`)
_STOPPED = []  # set by a command that stopped before its work was done (no "finished" line)


def _formats(text: str):
    vals = [v.strip().lstrip(".").lower() for v in str(text).split(",") if v.strip()]
    bad = [v for v in vals if v not in _FIG_FORMATS]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"formats are a comma list of {', '.join(_FIG_FORMATS[:3])} "
                                         f"(or {', '.join(_FIG_FORMATS[3:])}), got {text!r}")
    return vals


def _add_output_args(q, name: str, what: str = "figure file") -> None:
    """--out, --formats and --overwrite of a figure command."""
    q.add_argument("--out", default=None, metavar="PATH",
                   help=f"{what} (default: {_FIG_DIR}/{name}.png); the other --formats are written "
                   "beside it with the same stem")
    q.add_argument("--formats", type=_formats, default="png,pdf,svg",
                   help="formats written (comma list; default png,pdf,svg)")
    q.add_argument("--overwrite", action="store_true",
                   help="allow replacing figures committed in the repository's figures/ folder")


def _committed_folder(path: str):
    """The repository's ``figures/`` folder that holds ``path`` (a folder named figures beside
    ``setup.cfg`` and ``lesde/``), or None."""
    import os

    d = os.path.dirname(os.path.abspath(path))
    while True:
        parent = os.path.dirname(d)
        if (os.path.basename(d) == "figures" and os.path.isfile(os.path.join(parent, "setup.cfg"))
                and os.path.isfile(os.path.join(parent, "lesde", "__init__.py"))):
            return d
        if parent == d:
            return None
        d = parent


def _check_outputs(paths, option: str, overwrite: bool) -> None:
    """Each output can be written, and none replaces a committed figure unless --overwrite."""
    import os

    for path in paths:
        _check_out(path, option)
        if not overwrite and os.path.exists(path) and _committed_folder(path):
            raise ValueError(f"{option}: {path} is committed in the repository's figures/ folder; "
                             f"refusing to replace it (pass --overwrite to regenerate it, or write "
                             f"elsewhere with {option})")


def _figure_out(args, name: str, extra=()):
    """The main output path of a figure command (``--out`` or the default) and every file it
    will write (the figure in each format, then ``extra`` suffixes such as ``.csv``), checked."""
    import os

    from .plotting import figure_paths

    out = args.out or os.path.join(_FIG_DIR, f"{name}.png")
    _check_out(out, "--out")
    paths = figure_paths(out, args.formats)
    stem = os.path.splitext(out)[0]
    _check_outputs(paths + [stem + e for e in extra], "--out", args.overwrite)
    return out


def _wrote(*paths) -> None:
    for path in paths:
        _WROTE.append(str(path))
        print(f"wrote {path}")


def _wrote_figure(out, formats) -> None:
    from .plotting import figure_paths

    _wrote(*figure_paths(out, formats))


@_subcommand
def _add_demo(sub):
    p = sub.add_parser("demo", help="locally elastic vs non-elastic cross-entropy LE-SDE, one figure",
                       description="Simulates the cross-entropy LE-SDE with SGD sampling noise (K = 3, "
                       "n = 50, lr = 1) for a locally elastic case (alpha = 1, beta = 0.2) and a "
                       "non-elastic one (alpha = beta = 1), prints their final loss and accuracy, "
                       "and draws both side by side.")
    _add_output_args(p, "demo_trajectories")
    p.add_argument("--T", type=float, default=400.0, help="final time (lr-scaled)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (X(0) uses seed + 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=_run_demo)


def _run_demo(args):
    import numpy as np

    _check_args(args, T="pos_float", seed="nonneg_int")
    out = _figure_out(args, "demo_trajectories")
    from . import figures
    from .model import LESDE, Impacts
    from .solvers import initial_state, simulate

    K, n = 3, 50
    y = np.repeat(np.arange(K), n)
    sde = LESDE(y, Impacts.intra_inter(np.array([1.0, 1.0]), np.array([0.2, 1.0]), K), "cross_entropy",
                noise="sgd", lr=1.0)
    x0 = initial_state(2, K * n, K, std=0.5, seed=args.seed + 1)
    sol = simulate(sde, x0, np.linspace(0, args.T, 201), 0.5, seed=args.seed, progress=True)
    from .solvers import Solution

    cases = {}
    for b, title in enumerate(["locally elastic: alpha = 1, beta = 0.2", "not elastic: alpha = beta = 1"]):
        cases[title] = Solution(ts=sol.ts, labels=sol.labels, class_means=sol.class_means[:, b:b + 1],
                                within_cov=sol.within_cov[:, b:b + 1], states=sol.states[:, b:b + 1],
                                overflow_time=sol.overflow_time[b:b + 1], params=sol.params)
    print(f"cross-entropy LE-SDE, SGD sampling noise (lr = 1), K = {K}, n = {n}, T = {args.T:g} "
          f"({sol.params['wall_seconds']:.1f} s)")
    for line in _summary_lines(sde, sol):
        print("  " + line + "   [elastic, non-elastic]")
    figures.plot_demo(cases, out, formats=args.formats,
                      title=rf"Cross-entropy LE-SDE with SGD sampling noise ($h = 1$), $K = {K}$, "
                      rf"$n = {n}$ per class" "\nclass means (top) and samples (bottom), relative to "
                      "the grand mean")
    _wrote_figure(out, args.formats)


@_subcommand
def _add_figures(sub):
    p = sub.add_parser("figures", help="draw (and where cheap, compute) the package's figures",
                       description="The theory figures of the package. Each command writes to "
                       f"{_FIG_DIR}/ unless --out says otherwise (PNG, PDF and SVG), prints its "
                       "headline numbers and every file it wrote, and never replaces a figure "
                       "committed in the repository's figures/ folder without --overwrite. "
                       "`lesde figures all --out DIR` regenerates every theory figure and table.")
    fs = p.add_subparsers(dest="figure", metavar="FIGURE")
    fs.required = True
    q = fs.add_parser("all", help="every theory figure and its table (the sweeps included) into one folder",
                      description="Regenerates every theory figure of figures/ and its table into "
                      "--out, with the commands listed in figures/README.md: the demo, SGD vs SDE, "
                      "the four phase sweeps and their figures, neural collapse and the feature "
                      "clouds. Sweeps are resumable: rerunning the command continues them. At full "
                      "size this takes about 40 minutes on a busy 2-core machine; --small runs "
                      "every step at a tiny size (a smoke test).")
    q.add_argument("--out", default=None, metavar="DIR",
                   help=f"output folder (default: {_FIG_DIR}/all)")
    q.add_argument("--sweeps", default=None, metavar="DIR",
                   help="folder of the phase sweeps (default: DIR/sweeps, or ./sweeps when DIR is "
                   "the repository's figures/ folder; sweeps-small with --small)")
    q.add_argument("--small", action="store_true", help="tiny sizes (a smoke test of every step)")
    q.add_argument("--only", default=None, metavar="NAMES",
                   help="comma list of figure names to make (default: all of " +
                   ", ".join(name for name, *_ in _GALLERY) + ")")
    q.add_argument("--formats", type=_formats, default="png,pdf,svg",
                   help="formats written (comma list; default png,pdf,svg)")
    q.add_argument("--overwrite", action="store_true",
                   help="allow replacing figures committed in the repository's figures/ folder")
    q.add_argument("--workers", type=int, default=None,
                   help="run the phase sweeps on a local Dask cluster of N worker processes")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q.set_defaults(func=_run_fig_all)
    q = fs.add_parser("sgd-vs-sde", help="discrete feature SGD vs its SDE for several learning rates",
                      description="Runs discrete one-sample feature SGD and the SGD-noise LE-SDE "
                      "(cross-entropy drift, alpha = 1, beta = 0.2, K = 3, n = 50) from the same "
                      "X(0) for each learning rate h, prints the final class-0 label coordinate "
                      "and loss of both, and draws their means and 5-95% bands over runs.")
    _add_output_args(q, "sgd_vs_sde")
    q.add_argument("--runs", type=int, default=64, help="independent runs per learning rate")
    q.add_argument("--T", type=float, default=100.0, help="final time t = steps x h")
    q.add_argument("--lrs", type=_floats, default="2,1,0.5", help="learning rates h (comma list)")
    q.add_argument("--seed", type=int, default=0, help="random seed")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q.set_defaults(func=_run_fig_sgd_vs_sde)
    q = fs.add_parser("phase", help="draw a phase sweep (heat maps or curves per T)",
                      description="Draws a sweep written by `lesde phase`, or a table written by "
                      "--csv (e.g. the committed figures/phase_*.csv), and prints where P(separable) "
                      "is highest and lowest.")
    q.add_argument("sweep_dir", metavar="SWEEP",
                   help="directory written by `lesde phase`, or a table CSV written by --csv")
    q.add_argument("--out", default=None, metavar="PATH",
                   help=f"figure file (default: {_FIG_DIR}/phase_<sweep name>.png); the other "
                   "--formats are written beside it")
    q.add_argument("--formats", type=_formats, default="png,pdf,svg",
                   help="formats written (comma list; default png,pdf,svg)")
    q.add_argument("--overwrite", action="store_true",
                   help="allow replacing figures committed in the repository's figures/ folder")
    q.add_argument("--value", default="p_sep", help="table column to draw (default %(default)s)")
    q.add_argument("--csv", default=None, metavar="PATH",
                   help="also write the table to this CSV file, and its sweep specification beside "
                   "it (PATH without .csv + .spec.json), from which this command can redraw it")
    q.add_argument("--title", default=None, help="figure title (default: the model in words)")
    q.add_argument("--theory-c", type=float, default=None,
                   help="decay sweeps of the I-model: draw the heuristic boundary A(T;r)/K = "
                   "log(c w(T)/s0) with this c")
    q.set_defaults(func=_run_fig_phase)
    q = fs.add_parser("nc", help="NC1..NC4 and the training loss against time, CE drift, several (alpha, beta)",
                      description="Simulates the cross-entropy LE-SDE for each (alpha, beta) case "
                      "and draws the neural-collapse measures NC1-NC4 and the training loss over "
                      "time (medians over runs); the table goes beside the figure as CSV.")
    _add_output_args(q, "nc_ce_K4", "figure file (its table goes beside it as .csv)")
    q.add_argument("--cases", default="1,0.2;1,1;0.5,1", help="alpha,beta pairs separated by ';'")
    q.add_argument("--K", type=int, default=4, help="number of classes")
    q.add_argument("--n", type=int, default=50, help="samples per class")
    q.add_argument("--T", type=float, default=2000.0, help="final time")
    q.add_argument("--dt", type=float, default=0.5, help="step size")
    q.add_argument("--runs", type=int, default=8, help="runs per case (the figure shows medians)")
    q.add_argument("--noise", default="sgd", choices=["sgd", "both", "additive"],
                   help="SGD sampling noise at --lr, additive noise --sigma, or both")
    q.add_argument("--lr", type=float, default=1.0, help="learning rate h of the SGD noise")
    q.add_argument("--sigma", type=float, default=0.0, help="additive noise level")
    q.add_argument("--seed", type=int, default=0, help="random seed")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q.set_defaults(func=_run_fig_nc)
    q = fs.add_parser("clouds", help="feature clouds of elastic and non-elastic LE-SDEs at a few times",
                      description="Simulates the LE-SDE for each (alpha, beta) case from one X(0) "
                      "and draws the samples on the plane of the class means at each time, with "
                      "the loss and accuracy of the logits.")
    _add_output_args(q, "clouds_ce_K3")
    q.add_argument("--cases", default="1,0.2;1,1;0.5,1", help="alpha,beta pairs separated by ';'")
    q.add_argument("--times", type=_grid_values, default="0,25,100,400",
                   help="times of the columns (comma list or START:STOP:COUNT)")
    q.add_argument("--K", type=int, default=3, help="number of classes")
    q.add_argument("--n", type=int, default=50, help="samples per class")
    q.add_argument("--drift", default="cross_entropy", choices=["identity", "cross_entropy"],
                   help="drift field")
    q.add_argument("--noise", default="sgd", choices=["sgd", "both", "additive"],
                   help="SGD sampling noise at --lr, additive noise --sigma, or both")
    q.add_argument("--lr", type=float, default=1.0, help="learning rate h of the SGD noise")
    q.add_argument("--sigma", type=float, default=0.0, help="additive noise level")
    q.add_argument("--dt", type=float, default=0.5, help="step size")
    q.add_argument("--seed", type=int, default=0, help="random seed")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q.set_defaults(func=_run_fig_clouds)
    # [further figures are added here]


def _run_fig_sgd_vs_sde(args):
    import numpy as np

    _check_args(args, runs="pos_int", T="pos_float", lrs="pos_float", seed="nonneg_int")
    out = _figure_out(args, "sgd_vs_sde")
    from . import figures
    from .model import LESDE, Impacts
    from .solvers import initial_state, simulate, simulate_feature_sgd

    K, n = 3, 50
    y = np.repeat(np.arange(K), n)
    x0 = initial_state(args.runs, K * n, K, std=0.5, seed=args.seed + 1)
    d0 = np.eye(K)[0] - 1.0 / K
    results = []
    for i, h in enumerate(np.atleast_1d(args.lrs)):
        sde = LESDE(y, Impacts.intra_inter(1.0, 0.2, K), "cross_entropy", noise="sgd", lr=float(h))
        ts = np.arange(0.0, args.T + 1e-9, max(float(h), args.T / 100))
        ts = ts[np.abs(np.round(ts / h) * h - ts) < 1e-9]
        disc = simulate_feature_sgd(sde, x0, ts, seed=args.seed + 10 + i, progress=True)
        sde_sol = simulate(sde, x0, ts, min(0.1, float(h) / 4), seed=args.seed + 20 + i, progress=True)
        r = {"h": float(h), "ts": ts}
        for key, sol in (("disc", disc), ("sde", sde_sol)):
            r[f"{key}_coord"] = sol.class_means[:, :, 0] @ d0 / (d0 @ d0)
            r[f"{key}_loss"] = figures.training_loss_curve(sol.states, sol.labels)[0]
        results.append(r)
        print(f"h = {h:g}: final loss feature-SGD {np.mean(r['disc_loss'][-1]):.4f}, "
              f"SDE {np.mean(r['sde_loss'][-1]):.4f}; label coordinate {np.mean(r['disc_coord'][-1]):.3f} "
              f"vs {np.mean(r['sde_coord'][-1]):.3f}")
    figures.plot_sgd_vs_sde(results, out, formats=args.formats,
                            title=rf"Discrete feature SGD and its SDE: cross-entropy drift, "
                            rf"$\alpha = 1$, $\beta = 0.2$, $K = {K}$, $n = {n}$" "\n"
                            f"{args.runs} runs per learning rate from the same initial features")
    _wrote_figure(out, args.formats)


# The theory figures of figures/ and the commands that make them (figures/README.md lists the
# same commands). Each entry: name, the commands at full size (argument lists of `lesde`; "{out}"
# and "{sweeps}" are filled in), and the options that shrink each command for --small (appended:
# the last occurrence of an option wins).
_SMALL_GRID = ["--alpha", "0.2:1:3", "--beta", "0.2:1:3", "--times", "2,5", "--replicates", "2",
               "--n", "8", "--chunk-size", "64"]
_SMALL_DECAY = ["--times", "5,10", "--replicates", "2", "--n", "8", "--chunk-size", "64"]
_GALLERY = [
    ("demo_trajectories", [["demo", "--out", "{out}"]], [["--T", "20"]]),
    ("sgd_vs_sde", [["figures", "sgd-vs-sde", "--out", "{out}"]],
     [["--runs", "4", "--T", "4", "--lrs", "1,0.5"]]),
    ("phase_ce_K3",
     [["phase", "--alpha", "0.05:1:20", "--beta", "0.05:1:20", "--times", "25,100,400",
       "--replicates", "8", "--chunk-size", "400", "--seed", "0", "-o", "{sweeps}"],
      ["figures", "phase", "{sweeps}", "--out", "{out}", "--csv", "{csv}"]],
     [_SMALL_GRID, []]),
    ("phase_imodel_K3",
     [["phase", "--drift", "identity", "--noise", "additive", "--sigma", "0.1", "--comoving",
       "--alpha", "0.05:1:20", "--beta", "0.05:1:20", "--times", "25,100,400", "--replicates", "8",
       "--chunk-size", "400", "--seed", "0", "-o", "{sweeps}"],
      ["figures", "phase", "{sweeps}", "--out", "{out}", "--csv", "{csv}"]],
     [_SMALL_GRID, []]),
    ("phase_decay_imodel_K3",
     [["phase", "--drift", "identity", "--noise", "additive", "--sigma", "0.1", "--alpha", "1.5",
       "--beta", "0", "--t0", "1", "--r-alpha", "0.5:1.5:21", "--times", "100,1000,10000",
       "--dt", "0.5", "--replicates", "16", "--chunk-size", "400", "--seed", "0", "-o", "{sweeps}"],
      ["figures", "phase", "{sweeps}", "--out", "{out}", "--csv", "{csv}", "--theory-c", "5"]],
     [_SMALL_DECAY + ["--r-alpha", "0.5:1.5:3"], []]),
    ("phase_decay_ce_K3",
     [["phase", "--drift", "cross_entropy", "--noise", "sgd", "--lr", "1", "--alpha", "1",
       "--beta", "0.5", "--t0", "1", "--r", "0.5:1.5:21", "--times", "100,1000,10000", "--dt", "0.5",
       "--replicates", "8", "--chunk-size", "400", "--seed", "0", "-o", "{sweeps}"],
      ["figures", "phase", "{sweeps}", "--out", "{out}", "--csv", "{csv}"]],
     [_SMALL_DECAY + ["--r", "0.5:1.5:3"], []]),
    ("nc_ce_K4", [["figures", "nc", "--out", "{out}"]], [["--T", "5", "--runs", "2", "--n", "8"]]),
    ("clouds_ce_K3", [["figures", "clouds", "--out", "{out}"]], [["--times", "0,2,5", "--n", "8"]]),
]


def _gallery_commands(name: str, out_dir: str, sweeps_dir: str, small: bool = False):
    """The `lesde` argument lists that make one gallery figure into ``out_dir``."""
    import os

    entry = {e[0]: e for e in _GALLERY}[name]
    fill = {"{out}": os.path.join(out_dir, f"{name}.png"), "{csv}": os.path.join(out_dir, f"{name}.csv"),
            "{sweeps}": os.path.join(sweeps_dir, name)}
    cmds = []
    for cmd, shrink in zip(entry[1], entry[2]):
        cmds.append([fill.get(a, a) for a in cmd] + (list(shrink) if small else []))
    return cmds


def _run_fig_all(args):
    import os
    import time

    _check_args(args, workers="pos_int", threads="pos_int")
    out_dir = args.out or os.path.join(_FIG_DIR, "all")
    names = [e[0] for e in _GALLERY]
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in want if w not in names]
        if unknown or not want:
            raise ValueError(f"--only: unknown figure(s) {unknown}; choose from {', '.join(names)}")
        names = [n for n in names if n in want]
    _check_out(out_dir, "--out", directory=True)
    folder = "sweeps-small" if args.small else "sweeps"  # a small sweep is another sweep
    sweeps_dir = args.sweeps or (folder if _committed_folder(os.path.join(out_dir, "x"))
                                 else os.path.join(out_dir, folder))
    _check_out(sweeps_dir, "--sweeps", directory=True)
    from .plotting import figure_paths

    parser = build_parser()
    plan = []
    for name in names:
        for argv in _gallery_commands(name, out_dir, sweeps_dir, small=args.small):
            if argv[0] != "phase":
                argv += ["--formats", ",".join(args.formats)] + (["--overwrite"] if args.overwrite else [])
            if args.threads and argv[:2] != ["figures", "phase"]:
                argv += ["--threads", str(args.threads)]
            if args.workers and argv[0] == "phase":
                argv += ["--workers", str(args.workers)]
            if argv[0] == "phase":
                argv += ["--no-progress"]
            plan.append((name, argv, parser.parse_args(argv)))
    # every output checked before any work
    for name, argv, sub_args in plan:
        if argv[0] != "phase":
            out = os.path.join(out_dir, f"{name}.png")
            extra = [os.path.join(out_dir, f"{name}.csv")] if ("--csv" in argv or name.startswith("nc")) else []
            _check_outputs(figure_paths(out, args.formats) + extra, "--out", args.overwrite)
    del _WROTE[:]
    t0 = time.perf_counter()
    for i, (name, argv, sub_args) in enumerate(plan):
        print(f"\n[{i + 1}/{len(plan)}] lesde {' '.join(argv)}", flush=True)
        _threads(sub_args)
        sub_args.func(sub_args)
    wrote = list(_WROTE)
    print(f"\nfigures all: {time.perf_counter() - t0:.0f} s; wrote {len(wrote)} files "
          f"({'small sizes' if args.small else 'full size'}):")
    for path in wrote:
        print(f"  {path}")
    return 0


# --------------------------------------------------------------------------------------------
# phase sweeps (lesde.phase) and their figures
# --------------------------------------------------------------------------------------------
def _grid_values(text: str):
    """'0.1:1:10' -> 10 values from 0.1 to 1 (numpy.linspace); '0.2,0.5,1' -> a list;
    words (noise kinds, drift names) stay strings."""
    import numpy as np

    text = str(text).strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"a range is START:STOP:COUNT, got {text!r}")
        try:
            a, b = float(parts[0]), float(parts[1])
            count = float(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(f"a range is START:STOP:COUNT of numbers, got {text!r}") from None
        if not (np.isfinite(a) and np.isfinite(b)):
            raise argparse.ArgumentTypeError(f"START and STOP must be finite, got {text!r}")
        if not (np.isfinite(count) and count == int(count) and count >= 1):
            raise argparse.ArgumentTypeError(f"COUNT must be a positive integer, got {parts[2]!r} in {text!r}")
        if count > 10**7:
            raise argparse.ArgumentTypeError(f"COUNT {int(count)} is too many values for one axis")
        return [float(v) for v in np.linspace(a, b, int(count))]
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected values, got {text!r}")
    try:
        return [float(v) for v in vals]
    except ValueError:
        return vals


_PHASE_GRID_ARGS = (("alpha", "intra-class impact alpha0"), ("beta", "inter-class impact beta0"),
                    ("gap", "alpha - beta (sets alpha = beta + gap)"),
                    ("r", "decay exponent of both alpha(t) and beta(t)"),
                    ("r_alpha", "decay exponent of alpha(t) = alpha0 (1 + t/t0)^(-r)"),
                    ("r_beta", "decay exponent of beta(t)"), ("sigma", "additive noise level"),
                    ("init_std", "X(0) ~ N(0, init_std^2 I)"), ("K", "number of classes"),
                    ("n", "samples per class"), ("noise", "additive, sgd or both"),
                    ("lr", "learning rate h of the SGD noise"), ("t0", "time scale of the decay"))


@_subcommand
def _add_phase(sub):
    p = sub.add_parser(
        "phase", help="phase sweep: P(separable at T) over a parameter grid (resumable, Dask)",
        description="Sweep the LE-SDE over the Cartesian product of the grid arguments (each a "
        "value, a comma list, or START:STOP:COUNT), R replicates per point, batched and chunked. "
        "Chunks are written to OUT as they finish; rerunning the same command resumes. The order "
        "parameter is the training accuracy (= 1) of the model's own read-out for the "
        "cross-entropy drift and the nearest-class-centre accuracy otherwise; LP separability "
        "(any affine classifier, a weaker notion) is reported beside it.")
    g = p.add_argument_group("grid (a single value is a fixed parameter)")
    for name, text in _PHASE_GRID_ARGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=_grid_values, default=None, help=text)
    m = p.add_argument_group("model and scoring")
    m.add_argument("--drift", default="cross_entropy", choices=["identity", "label_projection", "cross_entropy"],
                   help="drift field G: identity (I-model), label_projection (L-model) or "
                   "cross_entropy (features are logits, p = K)")
    m.add_argument("--p", type=int, default=None, help="feature dimension (default K)")
    m.add_argument("--times", type=_grid_values, default=[400.0], help="times T at which to score (comma list)")
    m.add_argument("--dt", type=float, default=0.5, help="Euler-Maruyama step size")
    m.add_argument("--saves", type=int, default=41, help="save times on [0, max T] (time-to-separation resolution)")
    m.add_argument("--replicates", type=int, default=8, help="independent runs R per grid point")
    m.add_argument("--seed", type=int, default=0, help="seed of the sweep (each chunk derives its own)")
    m.add_argument("--chunk-size", type=int, default=256, help="runs per chunk (bounds memory)")
    m.add_argument("--loss-threshold", type=float, default=0.1,
                   help="training cross-entropy (nats) below which a run counts as separated by loss")
    m.add_argument("--no-lp", action="store_true", help="skip the LP separability test")
    m.add_argument("--comoving", action="store_true",
                   help="identity drift, additive noise: simulate in the frame of the grand mean")
    m.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                   help="floating-point precision of the simulation")
    m.add_argument("--method", default="euler", choices=["euler", "exact"],
                   help="euler: steps of --dt; exact: identity / label_projection drift with additive "
                   "noise sampled exactly at the save times (no steps; cost set by --saves)")
    m.add_argument("--increments", default="gaussian", choices=["gaussian", "rademacher"],
                   help="Euler increments: gaussian, or rademacher (two-point, weak order 1, cheaper)")
    r = p.add_argument_group("running")
    r.add_argument("-o", "--out", required=True, help="sweep directory (config.json, chunks/, table.csv)")
    r.add_argument("--dask-scheduler", default=None, metavar="ADDRESS", help="run the chunks on this Dask scheduler")
    r.add_argument("--workers", type=int, default=None, help="start a local Dask cluster of N worker processes")
    r.add_argument("--max-chunks", type=int, default=None, help="stop after this many new chunks")
    r.add_argument("--threads", type=int, default=None, help="torch threads per chunk")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar over chunks")
    p.set_defaults(func=_run_phase)


def _phase_spec_from_args(args):
    from .phase import PhaseSpec

    grid, fixed = [], {}
    for name in [n for n, _ in _PHASE_GRID_ARGS] + ["times"]:
        vals = getattr(args, name)
        if name != "noise" and vals is not None and any(isinstance(v, str) for v in vals):
            bad = next(v for v in vals if isinstance(v, str))
            raise ValueError(f"--{name.replace('_', '-')} takes numbers, got {bad!r}")
    _check_args(args, times="pos_float", dt="pos_float", saves="pos_int", replicates="pos_int",
                seed="nonneg_int", chunk_size="pos_int", loss_threshold="pos_float", p="pos_int",
                workers="pos_int", max_chunks="nonneg_int")
    for name, _ in _PHASE_GRID_ARGS:
        vals = getattr(args, name)
        if vals is None:
            continue
        if len(vals) > 1:
            grid.append((name, vals))
        elif name in ("gap", "r"):
            grid.append((name, vals))
        else:
            fixed[name] = vals[0]
    return PhaseSpec(grid=grid, drift=args.drift, p=args.p, times=tuple(args.times), dt=args.dt,
                     saves=args.saves, replicates=args.replicates, seed=args.seed,
                     chunk_size=args.chunk_size, loss_threshold=args.loss_threshold,
                     lp=not args.no_lp, comoving=args.comoving, dtype=args.dtype, method=args.method,
                     increments=args.increments, **fixed)


def _run_phase(args):
    import time

    from .phase import run_sweep

    spec = _phase_spec_from_args(args)
    client = cluster = None
    if args.dask_scheduler and args.workers:
        raise ValueError("give --dask-scheduler or --workers, not both")
    from .phase import _check_chunk_memory, _prepare_check

    finished = _prepare_check(spec, args.out)  # a finished sweep, or the output checked
    if finished is not None:
        print(f"phase sweep {spec.digest()} in {args.out} is already finished; nothing to do")
        for T, g in finished.groupby("T"):
            print(f"  T = {T:g}: mean P(separable) {g['p_sep'].mean():.3f} (order parameter), "
                  f"{g['p_lp'].mean():.3f} (LP, any affine classifier)")
        return 0
    if not args.dask_scheduler:
        _check_chunk_memory(spec, spec.chunks(), parallel=args.workers or 1)
    if args.dask_scheduler or args.workers:
        from distributed import Client, LocalCluster

        if args.workers:
            cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0")
            client = Client(cluster)
        else:
            client = Client(args.dask_scheduler)
    n_chunks = len(spec.chunks())
    print(f"phase sweep {spec.digest()}: {spec.num_points} points x {spec.replicates} replicates, "
          f"{n_chunks} chunks, times {list(spec.times)}, {spec.drift} drift -> {args.out}"
          + (f" on Dask scheduler {client.scheduler.address}" if client is not None else ""))
    t0 = time.perf_counter()
    try:
        table = run_sweep(spec, args.out, client=client, max_chunks=args.max_chunks, threads=args.threads,
                          progress=not args.no_progress)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    done = table.attrs.get("complete", False)
    if not done:
        _STOPPED.append("phase")
    print(f"{'sweep complete' if done else 'stopped (resume with the same command)'} in "
          f"{time.perf_counter() - t0:.1f} s; order parameter: {table['notion'].iloc[0]}")
    for T, g in table.groupby("T"):
        print(f"  T = {T:g}: mean P(separable) {g['p_sep'].mean():.3f} (order parameter), "
              f"{g['p_lp'].mean():.3f} (LP, any affine classifier)")
    print(f"wrote {args.out}/chunks/ (one file per completed chunk) and {args.out}/config.json")
    if done:
        print(f"wrote {args.out}/runs.parquet (one row per run)")
        print(f"wrote {args.out}/table.csv")


def _table_spec(table, csv_path) -> dict:
    """The sweep specification of a table read from CSV: the ``.spec.json`` written beside it
    by ``figures phase --csv``, else what the table's columns say (swept parameters are the
    grid columns with more than one value)."""
    import json
    import os

    side = os.path.splitext(csv_path)[0] + ".spec.json"
    if os.path.exists(side):
        try:
            with open(side) as f:
                d = json.load(f)
            spec = d["spec"]
            if not isinstance(spec, dict) or not isinstance(spec.get("grid"), list):
                raise TypeError("no grid")
            return spec
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{side}: not a sweep specification written by lesde ({exc})") from None
    from .phase import PhaseSpec, _GRID_KEYS

    spec = PhaseSpec(grid=()).to_dict()
    grid = []
    for name in _GRID_KEYS:
        if name in table.columns:
            vals = list(dict.fromkeys(table[name].tolist()))
            if len(vals) > 1:
                grid.append([name, sorted(vals)])
            else:
                spec[name] = vals[0]
    spec["grid"] = grid
    if "runs" in table.columns:
        spec["replicates"] = int(table["runs"].max())
    spec["times"] = sorted(float(t) for t in table["T"].unique())
    return spec


def _run_fig_phase(args):
    import json
    import os

    from . import figures

    source = args.sweep_dir
    is_csv = os.path.isfile(source) and source.lower().endswith(".csv")
    name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    args.out = args.out or os.path.join(_FIG_DIR, name if name.startswith("phase") else f"phase_{name}")
    out = _figure_out(args, "phase")
    if args.csv:
        _check_outputs([args.csv, os.path.splitext(args.csv)[0] + ".spec.json"], "--csv", args.overwrite)
    if is_csv:
        import pandas as pd

        try:
            table = pd.read_csv(source)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{source}: not a readable table ({exc})") from None
        missing = {"T", "p_sep"} - set(table.columns)
        if missing:
            raise ValueError(f"{source}: not a phase table (no column {sorted(missing)})")
        table.attrs.update({"complete": True, "spec": _table_spec(table, source)})
    else:
        from .phase import load_sweep

        _, table = load_sweep(source)
        if not table.attrs.get("complete", False):
            print("warning: the sweep is not finished; drawing the finished chunks")
    if args.value not in table.columns:
        raise ValueError(f"--value {args.value!r} is not a table column; e.g. p_sep, p_lp, p_loss, "
                         f"loss_mean, nc1_mean, t_sep_mean")
    if args.csv:
        from .storage import atomic_write

        with atomic_write(args.csv, "w", newline="") as f:
            table.to_csv(f, index=False, float_format="%.6g")
        side = os.path.splitext(args.csv)[0] + ".spec.json"
        with atomic_write(side, "w") as f:
            json.dump({"format": "lesde-phase-table", "spec": table.attrs["spec"]}, f, indent=1,
                      sort_keys=True)
            f.write("\n")
        _wrote(args.csv, side)
    notion = str(table["notion"].iloc[0]) if "notion" in table.columns else "p_sep"
    for T, g in table.groupby("T"):
        print(f"T = {T:g}: P(separable: {notion}) = 1 at {int((g['p_sep'] == 1).sum())} and 0 at "
              f"{int((g['p_sep'] == 0).sum())} of {len(g)} points (mean {g['p_sep'].mean():.3f})")
    figures.plot_phase(table, out, value=args.value, title=args.title, theory_c=args.theory_c,
                       formats=args.formats)
    _wrote_figure(out, args.formats)


def _cases(text):
    pairs = []
    for item in str(text).split(";"):
        try:
            a, b = (float(v) for v in item.split(","))
        except ValueError:
            raise ValueError(f"--cases: each case is ALPHA,BETA (cases separated by ';'), got "
                             f"{item!r}") from None
        pairs.append((a, b))
    if not pairs:
        raise ValueError("--cases needs at least one alpha,beta pair")
    return pairs


def _noise_words(args) -> str:
    if args.noise == "sgd":
        return f"SGD sampling noise ($h = {args.lr:g}$)"
    if args.noise == "additive":
        return rf"additive noise ($\sigma = {args.sigma:g}$)"
    return rf"SGD sampling noise ($h = {args.lr:g}$) and additive noise ($\sigma = {args.sigma:g}$)"


def _run_fig_nc(args):
    import os

    import numpy as np

    cases = _cases(args.cases)
    _check_args(args, K="pos_int", n="pos_int", T="pos_float", dt="pos_float", runs="pos_int",
                lr="pos_float", sigma="nonneg_float", seed="nonneg_int")
    out = _figure_out(args, "nc_ce_K4", extra=(".csv",))
    from . import figures
    from .model import LESDE, Impacts
    from .phase import collapse_over_time
    from .solvers import initial_state, simulate

    K, R = args.K, args.runs
    y = np.repeat(np.arange(K), args.n)
    a = np.repeat([c[0] for c in cases], R)
    b = np.repeat([c[1] for c in cases], R)
    sgd = args.noise in ("sgd", "both")
    sde = LESDE(y, Impacts.intra_inter(a, b, K), "cross_entropy", sigma=args.sigma, noise=args.noise,
                lr=args.lr if sgd else None)
    x0 = initial_state(len(a), K * args.n, K, std=0.5, seed=args.seed + 1)
    ts = np.concatenate([[0.0], np.geomspace(1.0, args.T, 60)])
    sol = simulate(sde, x0, ts, args.dt, seed=args.seed, record="full", progress=True)
    names = [f"alpha = {c[0]:g}, beta = {c[1]:g}" for c in cases for _ in range(R)]
    frame = collapse_over_time(sol.states, y, readout="identity", runs=names)
    frame.insert(0, "t", sol.ts[frame["time_index"].to_numpy()])
    summary = frame.drop(columns="time_index").groupby(["run", "t"], sort=False).median().reset_index()
    summary = summary.rename(columns={"run": "case"})
    csv = os.path.splitext(out)[0] + ".csv"
    from .storage import atomic_write

    with atomic_write(csv, "w", newline="") as f:
        summary.to_csv(f, index=False, float_format="%.6g")
    title = (f"Neural collapse in the cross-entropy LE-SDE: $K = {K}$, $n = {args.n}$ per class, "
             f"{_noise_words(args)}\nmedians over {R} runs; $W$: the identity read-out of the "
             "logits (centred), $M$: the centred class means")
    for case, g in summary.groupby("case", sort=False):
        last = g.iloc[-1]
        print(f"{case}: at t = {last['t']:g} NC1 {last['nc1']:.3g}, ETF angle {last['etf_angle']:.3g}, "
              f"equinorm {last['equinorm']:.3g}, NC3 {last['nc3']:.3g}, NC4 {last['nc4']:.3g}, "
              f"loss {last['loss']:.3g}, accuracy {last['accuracy']:.3g}")
    _wrote(csv)
    figures.plot_neural_collapse(summary, out, title=title, formats=args.formats)
    _wrote_figure(out, args.formats)


def _run_fig_clouds(args):
    import numpy as np

    cases = _cases(args.cases)
    _check_args(args, K="pos_int", n="pos_int", times="nonneg_float", dt="pos_float",
                lr="pos_float", sigma="nonneg_float", seed="nonneg_int")
    out_path = _figure_out(args, "clouds_ce_K3")
    from . import figures
    from .model import LESDE, Impacts
    from .solvers import Solution, initial_state, simulate

    K = args.K
    y = np.repeat(np.arange(K), args.n)
    a = np.array([c[0] for c in cases])
    b = np.array([c[1] for c in cases])
    sgd = args.noise in ("sgd", "both")
    sde = LESDE(y, Impacts.intra_inter(a, b, K), args.drift, sigma=args.sigma, noise=args.noise,
                lr=args.lr if sgd else None, dim=K)
    x0 = initial_state(1, K * args.n, K, std=0.5, seed=args.seed + 1).expand(len(cases), -1, -1)
    ts = np.unique(np.concatenate([[0.0], np.asarray(args.times, dtype=float)]))
    sol = simulate(sde, x0, ts, args.dt, seed=args.seed, record="full", progress=True)
    out = {}
    for i, (ai, bi) in enumerate(cases):
        kind = "locally elastic" if ai > bi else "not elastic"
        out[f"{kind}: alpha = {ai:g}, beta = {bi:g}"] = Solution(
            ts=sol.ts, labels=sol.labels, class_means=sol.class_means[:, i:i + 1],
            within_cov=sol.within_cov[:, i:i + 1], states=sol.states[:, i:i + 1],
            overflow_time=sol.overflow_time[i:i + 1], params=sol.params)
    loss, acc = figures.training_loss_curve(sol.states, sol.labels)
    for i, (ai, bi) in enumerate(cases):
        print(f"alpha = {ai:g}, beta = {bi:g}: loss " + ", ".join(
            f"{loss[j, i]:.3g}" for j in range(len(ts))) + "; accuracy " + ", ".join(
            f"{acc[j, i]:.2f}" for j in range(len(ts))) + f" at t = {', '.join(f'{t:g}' for t in ts)}")
    drift = {"cross_entropy": "Cross-entropy drift", "identity": "Identity drift"}[args.drift]
    figures.plot_feature_clouds(out, out_path, formats=args.formats,
                                subtitle=f"{drift}, {_noise_words(args)}, $K = {K}$, $n = {args.n}$ per class")
    _wrote_figure(out_path, args.formats)


# Pattern for a new subcommand (keep imports of heavy modules inside _run_<name>):
#
# @_subcommand
# def _add_name(sub):
#     p = sub.add_parser("name", help="...")
#     p.add_argument(...)
#     p.set_defaults(func=_run_name)
#
# def _run_name(args):
#     from . import module
#     ...


# --------------------------------------------------------------------------------------------
# subcommands (local elasticity on networks)
# --------------------------------------------------------------------------------------------
# Dan et al.'s CIFAR-10 classes, the default of `elasticity track`
DAN_CLASSES = ("airplane", "automobile", "ship")


@_subcommand
def _add_elasticity(sub):
    p = sub.add_parser(
        "elasticity",
        help="local elasticity of real networks: torus check, similarity matrix, "
        "He & Su clustering, Dan et al. tracking",
        description="Local elasticity measured on networks (He & Su, ICLR 2020; Dan et al., "
        "arXiv 2111.01166). Results go to --out as CSV plus figures.",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="random seed (data sample, initialisation)")
    p.add_argument("--out", default="elasticity_out", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_elasticity)
    jobs = p.add_subparsers(dest="job", metavar="JOB")
    jobs.required = True

    def data_args(q, classes, per_class, classes_note=""):
        q.add_argument("--data", default="digits",
                       help="CIFAR-10 (batches dir, image folder or zip), or 'digits' for "
                       "scikit-learn's 8x8 digits (no download)")
        q.add_argument("--classes", nargs="+", default=classes,
                       help="class names or indices" + classes_note)
        q.add_argument("--per-class", type=int, default=per_class, help="images per class")

    def act_args(q, default):
        q.add_argument("--activations", nargs="+", default=default,
                       help="relu, tanh, linear, elephant (PyTorch's initialisation) and "
                       "elephant_spread (first-layer biases spread, --bias-spread)")
        q.add_argument("--elephant-a", type=float, default=None, help="elephant half-width a")
        q.add_argument("--elephant-d", type=float, default=4.0, help="elephant power d")
        q.add_argument("--bias-spread", type=float, default=None,
                       help="sd of the evenly spread first-layer biases of elephant_spread")

    t = jobs.add_parser("torus", help="S_rel vs geodesic distance on the torus curves, per "
                        "activation, at initialisation and after training")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="seeds, one network per seed and activation")
    t.add_argument("--hidden", type=int, default=512, help="hidden width of the two-layer network")
    t.add_argument("--steps", type=int, nargs="+", default=[0, 2000],
                   help="full-batch SGD steps before probing (0 = at initialisation)")
    t.add_argument("--lr", type=float, default=0.01, help="SGD step (the linear net uses --lr-linear)")
    t.add_argument("--lr-linear", type=float, default=0.001, help="SGD step of the linear network")
    act_args(t, ["relu", "tanh", "elephant", "elephant_spread", "linear"])

    m = jobs.add_parser("matrix", help="pairwise S matrix (row = update, column = probe)")
    data_args(m, ["0", "1"], 50)
    m.add_argument("--kind", choices=["relative", "kernelized", "kl"], default="relative",
                   help="S_rel (He & Su), S_ker (He & Su) or Dan et al.'s KL relative similarity")
    m.add_argument("--method", choices=["ntk", "step"], default="ntk",
                   help="ntk: the eta -> 0 limit through the empirical NTK; step: an explicit step of --lr")
    m.add_argument("--lr", type=float, default=1e-4, help="probe step size eta")
    m.add_argument("--normalize", action="store_true", help="normalised kernel")
    m.add_argument("--hidden", type=int, default=512, help="hidden width of the two-layer network")
    m.add_argument("--activation", default="relu", help="relu, tanh or linear")

    c = jobs.add_parser("cluster", help="He & Su's LE clustering of class pairs + baselines, "
                        "several seeds, with chance levels")
    c.add_argument("--data", default="digits",
                   help="CIFAR-10 (batches dir, image folder or zip), or 'digits' (scikit-learn's)")
    c.add_argument("--pairs", nargs="+", default=["3-5"],
                   help="class pairs a-b, e.g. automobile-cat deer-dog (or 3-5 for digits)")
    c.add_argument("--per-class", type=int, default=500, help="primary images per class")
    c.add_argument("--aux", choices=["hesu", "others"], default="hesu",
                   help="hesu: He & Su's auxiliary classes for the pair (CIFAR-10), --aux-total "
                   "images; others: --aux-per-class from each other class")
    c.add_argument("--aux-total", type=int, default=1000, help="auxiliary images in all (--aux hesu)")
    c.add_argument("--aux-per-class", type=int, default=50,
                   help="auxiliary images from each other class (--aux others)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="each seed: data sample, initialisation, shuffling, K-means")
    c.add_argument("--kernel-widths", nargs="*", default=["inf", "40960"],
                   help="widths of the closed-form two-layer NTK (relu and linear; 'inf' = limit)")
    c.add_argument("--outputs", nargs="+", default=["logits", "probabilities"],
                   choices=["logits", "probabilities"],
                   help="network outputs whose similarities are clustered")
    c.add_argument("--trained-width", type=int, default=0,
                   help="also train real networks of this width (0: none), --activations")
    c.add_argument("--init-kernel-width", type=int, default=0,
                   help="also networks of this width in the kernel regime: the exact NTK at "
                   "initialisation, trained in function space (0: none), --activations")
    act_args(c, ["relu", "linear"])
    c.add_argument("--epochs", type=int, default=200, help="training epochs (He & Su's)")
    c.add_argument("--lr", type=float, default=3e-3,
                   help="SGD step at width 40,960 (He & Su); a width-m network uses lr * 40960 / m, "
                   "the same step in function space")
    c.add_argument("--batch-size", type=int, default=500, help="mini-batch size")
    c.add_argument("--loss", choices=["bce", "mse"], default="bce",
                   help="training loss: binary cross-entropy or mean squared error")
    c.add_argument("--replot", action="store_true",
                   help="only redraw clustering.png from the clustering_summary.csv in --out")

    k = jobs.add_parser("track", help="Dan et al.: S_rel (KL, norm ratios) during training, "
                        "several runs, resumable")
    data_args(k, list(DAN_CLASSES), 5000, classes_note="; 0 1 2 when --data is digits")
    k.add_argument("--net", default="resnet18_imagenet",
                   help="resnet18_imagenet (Dan et al.'s, no BatchNorm), resnet18 (CIFAR layout, "
                   "no BatchNorm) or mlp (one hidden layer, --hidden, --activation)")
    k.add_argument("--width", type=float, default=1.0, help="channel multiplier of the ResNets")
    k.add_argument("--hidden", type=int, default=512, help="MLP width")
    k.add_argument("--activation", default="relu",
                   help="MLP activation (relu, tanh, elephant, elephant_spread, linear)")
    k.add_argument("--elephant-a", type=float, default=None, help="elephant half-width a (default 0.25)")
    k.add_argument("--elephant-d", type=float, default=4.0, help="elephant power d")
    k.add_argument("--bias-spread", type=float, default=None,
                   help="sd of the spread first-layer biases of elephant_spread")
    k.add_argument("--probes", type=int, default=20, help="probe examples per class")
    k.add_argument("--test-per-class", type=int, default=1000, help="held-out test images per class")
    k.add_argument("--epochs", type=int, default=7, help="training epochs")
    k.add_argument("--batch-size", type=int, default=256, help="mini-batch size")
    k.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    k.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay")
    k.add_argument("--every", type=int, default=9, help="minibatches between records")
    k.add_argument("--schedule", choices=["epoch", "global"], default="epoch",
                   help="epoch: after minibatch b of each epoch with b %% every == 0 (their code)")
    k.add_argument("--augment", choices=["once", "none"], default="once",
                   help="random crop (pad 4) + flip applied once to the training set (their code)")
    k.add_argument("--normalize", choices=["dan", "half"], default="dan",
                   help="dan: their channel mean/std; half: (x - 0.5) / 0.5")
    k.add_argument("--runs", type=int, default=3, help="independent runs, seeds SEED..SEED+RUNS-1")
    k.add_argument("--run-ids", type=int, nargs="+", default=None,
                   help="only these runs (0-based; e.g. to share them between two processes); the "
                   "summary then covers the runs of --out that are complete")
    k.add_argument("--work", default=None,
                   help="checkpoints and per-pair matrices (default runs/elasticity/<name of --out>)")
    k.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates over probes")

    cmp_ = jobs.add_parser("compare", help="tracking runs of --out against Dan et al.'s released "
                           "curves, record by record")
    cmp_.add_argument("--reference", required=True, help="srel_curves.csv of the released curves")
    cmp_.add_argument("--partial", action="store_true",
                      help="also the records so far of unfinished runs, read from their checkpoints "
                      "in --work; each record is compared over the runs that reached it")
    cmp_.add_argument("--work", default=None,
                      help="where the checkpoints are (default runs/elasticity/<name of --out>)")


def _run_elasticity(args):
    import csv
    import json
    import os

    import numpy as np
    import torch

    from . import elasticity as el
    from . import figures
    from .nets import MLP, build_net

    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress

    def load(path, classes, per_class, split="train", seed=args.seed):
        """(x float tensor, labels 0..len(classes)-1) from CIFAR-10 or sklearn digits."""
        if path == "digits":
            from .data import load_digits

            try:   # a fixed train/test partition of the digits: no image is in both
                return load_digits(classes, per_class, split=split, seed=seed, as_tensor=True,
                                   at_most=True)   # the CIFAR-sized defaults ask for more
            except ValueError as exc:
                raise SystemExit(f"--data digits: {exc}")
        from .data import load_cifar10

        cls = [int(c) if str(c).isdigit() else c for c in classes]
        return load_cifar10(path, split=split, classes=cls, per_class=per_class, seed=seed, as_tensor=True)

    def all_classes(path):
        if path == "digits":
            return [str(i) for i in range(10)]
        from .data import CIFAR10_CLASSES

        return list(CIFAR10_CLASSES)

    def write_csv(name, rows):
        with open(os.path.join(args.out, name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {os.path.join(args.out, name)}")

    if args.job == "torus":
        return _elasticity_torus(args, write_csv)
    if args.job == "matrix":
        x, y = load(args.data, args.classes, args.per_class)
        torch.manual_seed(args.seed)
        net = MLP(x[0].numel(), hidden=(args.hidden,), num_classes=len(args.classes),
                  activation=None if args.activation == "linear" else args.activation)
        el.train_classifier(net, x, y, epochs=10, lr=0.05, loss="cross_entropy", seed=args.seed,
                            progress=progress)
        kw = {"lr": args.lr} if args.kind == "kl" else {"lr": args.lr, "method": args.method}
        s = el.similarity_matrix(net, x, y, kind=args.kind, normalize=args.normalize, **kw)
        csv_path = os.path.join(args.out, f"S_{args.kind}.csv")
        np.savetxt(csv_path, s.numpy(), delimiter=",")
        means = el.class_pair_means(s, y)
        print("class-pair means (row = update class, column = probe class):")
        print(np.array2string(means.numpy(), precision=4))
        png_path = os.path.join(args.out, f"S_{args.kind}.png")
        figures.plot_matrix(s.numpy(), f"S_{args.kind} (symmetrised)", png_path)
        print(f"wrote {csv_path} (row = update, column = probe) and {png_path} (and .pdf, .svg "
              f"beside it)")
        return 0

    if args.job == "cluster":
        return _elasticity_cluster(args, load, all_classes, write_csv, progress)
    if args.job == "compare":
        return _elasticity_compare(args, write_csv)
    return _elasticity_track(args, load, progress)


def _activation_spec(name, args, default_a):
    """(activation, activation_kwargs, bias_spread) of an activation name of the elasticity jobs."""
    if name == "linear":
        return None, None, None
    if name in ("elephant", "elephant_spread"):
        kw = {"a": args.elephant_a if args.elephant_a is not None else default_a, "d": args.elephant_d}
        if name == "elephant":
            return "elephant", kw, None
        if args.bias_spread is None:
            raise SystemExit("elephant_spread needs --bias-spread")
        return "elephant", kw, args.bias_spread
    return name, None, None


def _elasticity_torus(args, write_csv) -> int:
    """Torus locality per activation and seed, at initialisation and after training."""
    import os

    import numpy as np

    from . import elasticity as el
    from . import figures

    rows, profiles = [], {}
    if args.bias_spread is None:
        args.bias_spread = 5.4   # 2 x the pre-activation sd at PyTorch's initialisation on the torus
    for name in args.activations:
        act, kw, spread = _activation_spec(name, args, default_a=1.0)
        for steps in args.steps:
            for seed in args.seeds:
                r = el.torus_locality(act, seed=seed, hidden=args.hidden, steps=steps,
                                      lr=args.lr_linear if name == "linear" else args.lr,
                                      activation_kwargs=kw, bias_spread=spread)
                near_far = float(r.bin_means[0] / np.mean(r.bin_means[-3:]))
                row = {"network": name, "steps": steps, "seed": seed, "pearson": round(r.pearson, 4),
                       "pearson_abscos": round(r.pearson_abscos, 4), "monotone": int(r.monotone),
                       "near_far": round(near_far, 3), "train_accuracy": r.train_accuracy,
                       "final_loss": round(r.final_loss, 4)}
                row.update({f"bin{b}": round(float(v), 4) for b, v in enumerate(r.bin_means)})
                rows.append(row)
                profiles.setdefault((name, steps), []).append(r.bin_means)
                print(f"{name:16s} steps {steps:5d} seed {seed}: Pearson {r.pearson:+.3f}, "
                      f"|cos| {r.pearson_abscos:+.3f}, monotone {r.monotone}, near/far {near_far:.2f}")
    write_csv("torus_locality.csv", rows)
    import pandas as pd

    tab = pd.DataFrame(rows)
    agg = tab.groupby(["network", "steps"], sort=False).agg(
        pearson_mean=("pearson", "mean"), pearson_sd=("pearson", "std"),
        abscos_mean=("pearson_abscos", "mean"), abscos_sd=("pearson_abscos", "std"),
        monotone_frac=("monotone", "mean"), near_far_mean=("near_far", "mean"),
        near_far_sd=("near_far", "std"), train_accuracy=("train_accuracy", "mean"),
        seeds=("seed", "count")).reset_index().round(4)
    write_csv("torus_summary.csv", agg.to_dict("records"))
    edges = np.linspace(0, np.pi, len(next(iter(profiles.values()))[0]) + 1)
    figures.plot_torus_profiles(profiles, edges, os.path.join(args.out, "torus_locality.png"))
    return 0


_HESU_AUX = {frozenset(("automobile", "cat")): ["bird"],
             frozenset(("automobile", "horse")): ["cat", "bird"],
             frozenset(("bird", "cat")): ["automobile"],
             frozenset(("deer", "dog")): ["frog"],
             frozenset(("automobile", "bird")): ["cat"],
             frozenset(("deer", "frog")): ["dog"]}
"""He & Su's auxiliary (label-0) classes for their CIFAR-10 pairs (their run scripts)."""


def _elasticity_cluster(args, load, all_classes, write_csv, progress) -> int:
    """He & Su's clustering over pairs and seeds: closed-form wide networks, optionally trained
    finite networks, baselines; per-seed table and a summary with chance levels."""
    import math
    import os

    import numpy as np
    import pandas as pd
    import torch

    from . import elasticity as el
    from . import figures
    from .nets import MLP

    if args.replot:
        figures.plot_clustering_summary(pd.read_csv(os.path.join(args.out, "clustering_summary.csv"),
                                                    keep_default_na=False, na_values=[""]),
                                        os.path.join(args.out, "clustering.png"))
        print(f"wrote {os.path.join(args.out, 'clustering.png')} (and .pdf, .svg beside it)")
        return 0
    rows = []
    names = all_classes(args.data)
    if args.bias_spread is None:
        args.bias_spread = 0.6   # 2 x the pre-activation sd at PyTorch's initialisation on CIFAR-10
    for pair in args.pairs:
        a, b = pair.split("-")
        if args.aux == "hesu" and args.data != "digits":
            aux = _HESU_AUX.get(frozenset((a, b)))
            if aux is None:
                raise SystemExit(f"no He & Su auxiliary classes known for {pair}; use --aux others")
            aux_per = [args.aux_total // len(aux)] * len(aux)
        else:
            aux = [c for c in names if c not in (a, b) and str(names.index(c)) not in (a, b)]
            aux_per = [args.aux_per_class] * len(aux)
        for seed in args.seeds:
            xp, yp = load(args.data, [a, b], args.per_class, seed=seed)
            xa = torch.cat([load(args.data, [c], n, seed=seed)[0] for c, n in zip(aux, aux_per)])

            def add(res, network, width, output):
                for meth, acc in res.accuracy.items():
                    base = meth.startswith(("kmeans_raw", "pca"))
                    rows.append({"pair": pair, "seed": seed, "network": "-" if base else network,
                                 "width": "-" if base else width, "output": "-" if base else output,
                                 "method": meth, "accuracy": round(acc, 4)})
                print(f"{pair:18s} seed {seed} {network:16s} {width:>6} {output:13s} "
                      + " ".join(f"{m} {v:.3f}" for m, v in res.accuracy.items()))

            first = True
            for width in args.kernel_widths:
                w = math.inf if width == "inf" else float(width)
                for act in ("relu", "linear"):
                    for output in args.outputs:
                        if output == "probabilities" and math.isinf(w):
                            continue
                        res = el.ntk_cluster_pair(xp, yp, xa, activation=None if act == "linear" else act,
                                                  width=w, output=output, loss=args.loss, lr=args.lr,
                                                  epochs=args.epochs, batch_size=args.batch_size,
                                                  seed=seed, baselines=first)
                        first = False
                        add(res, f"{act} (NTK)", width, output)
            if args.init_kernel_width:
                x_all = torch.cat([xp, xa])
                for name in args.activations:
                    act, kw, spread = _activation_spec(name, args, default_a=0.1)
                    torch.manual_seed(seed)
                    net = MLP(xp[0].numel(), hidden=(args.init_kernel_width,), num_classes=1,
                              activation=act, activation_kwargs=kw, bias_spread=spread).double()
                    theta = el.mlp_ntk(net, x_all)
                    for output in args.outputs:
                        res = el.ntk_cluster_pair(xp, yp, xa, output=output, loss=args.loss,
                                                  lr=args.lr * 40960 / args.init_kernel_width,
                                                  epochs=args.epochs, batch_size=args.batch_size,
                                                  seed=seed, baselines=first, theta=theta)
                        first = False
                        add(res, f"{name} (init NTK)", args.init_kernel_width, output)
            if args.trained_width:
                for name in args.activations:
                    act, kw, spread = _activation_spec(name, args, default_a=0.1)
                    torch.manual_seed(seed)
                    net = MLP(xp[0].numel(), hidden=(args.trained_width,), num_classes=1, activation=act,
                              activation_kwargs=kw, bias_spread=spread)
                    lr = args.lr * 40960 / args.trained_width
                    res = el.cluster_pair(net, xp, yp, xa, epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                                          loss=args.loss, output=args.outputs[0], seed=seed, baselines=first,
                                          progress=progress)
                    first = False
                    add(res, name, args.trained_width, args.outputs[0])
                    if len(args.outputs) > 1:   # the other output of the same trained network
                        with torch.no_grad():
                            z = net(xp).reshape(-1)
                        for output in args.outputs[1:]:
                            s_rel, s_ker = el.kernel_similarities(el.mlp_ntk(net, xp), z, output)
                            res2 = el._finish_clustering(yp.numpy(), xp, s_rel, s_ker, seed, False, 100,
                                                         False, res.history, output)
                            add(res2, name, args.trained_width, output)
            pd.DataFrame(rows).to_csv(os.path.join(args.out, "clustering.csv"), index=False)  # so far
    write_csv("clustering.csv", rows)
    tab = pd.DataFrame(rows)
    agg = tab.groupby(["pair", "network", "width", "output", "method"], sort=False)["accuracy"].agg(
        ["mean", "std", "count"]).reset_index()
    chance = {}
    for pair in tab["pair"].unique():
        ch = el.clustering_chance((args.per_class, args.per_class))
        chance[pair] = ch
    agg["chance_mean"] = [chance[p]["mean"] for p in agg["pair"]]
    agg["chance_sd"] = [chance[p]["sd"] for p in agg["pair"]]
    agg["chance_q95"] = [chance[p]["q95"] for p in agg["pair"]]
    agg = agg.rename(columns={"mean": "accuracy_mean", "std": "accuracy_sd", "count": "seeds"}).round(4)
    write_csv("clustering_summary.csv", agg.to_dict("records"))
    figures.plot_clustering_summary(agg, os.path.join(args.out, "clustering.png"))
    print(f"wrote {os.path.join(args.out, 'clustering.png')} (and .pdf, .svg beside it)")
    return 0


def _elasticity_track(args, load, progress) -> int:
    """Dan et al.'s tracking protocol, ``--runs`` runs, each resumable; per-run CSVs and a
    summary with chance levels, bands over runs and bootstrap bands over probes."""
    import json
    import os

    import numpy as np
    import torch

    from . import elasticity as el
    from . import figures
    from .nets import MLP, ResNet18ImageNet, build_net

    work = args.work or os.path.join("runs", "elasticity", os.path.basename(os.path.normpath(args.out)))
    os.makedirs(work, exist_ok=True)
    mean = torch.tensor(el.DAN_CIFAR10_MEAN if args.normalize == "dan" else (0.5,) * 3)[None, :, None, None]
    std = torch.tensor(el.DAN_CIFAR10_STD if args.normalize == "dan" else (0.5,) * 3)[None, :, None, None]

    def inputs(split, per_class, seed, augment):
        x, y = load(args.data, args.classes, per_class, split=split, seed=seed)
        if args.data != "digits":   # [-1, 1] -> [0, 1], augment, normalise
            x = (x + 1) / 2
            if augment:
                x = el.crop_flip(x, pad=4, fill=0.0, seed=seed)
            x = (x - mean) / std
        return x, y

    if args.data == "digits" and list(args.classes) == list(DAN_CLASSES):
        args.classes = ["0", "1", "2"]   # the CIFAR-10 default names mean nothing for digits

    def as_images(x):   # digits come flat (8 x 8 = 64 values); the ResNets take 1 x 8 x 8 images
        return x.reshape(len(x), 1, 8, 8) if args.data == "digits" and args.net != "mlp" else x

    frames, pairs_last = [], []
    for r in (args.run_ids if args.run_ids is not None else range(args.runs)):
        seed = args.seed + r
        csv_path = os.path.join(args.out, f"run{r}_tracking.csv")
        pairs_path = os.path.join(work, f"run{r}_pairs.npz")
        if os.path.exists(csv_path) and os.path.exists(pairs_path):
            import pandas as pd

            print(f"run {r}: {csv_path} exists, kept")
            frames.append(pd.read_csv(csv_path))
            pairs_last.append(dict(np.load(pairs_path)))
            continue
        x, y = inputs("train", args.per_class, seed, args.augment == "once")
        xt, yt = inputs("test", args.test_per_class, seed, False)
        x, xt = as_images(x), as_images(xt)
        rng = np.random.default_rng(seed)
        probe = np.concatenate([rng.choice(np.where(y.numpy() == c)[0], args.probes, replace=False)
                                for c in range(len(args.classes))])
        torch.manual_seed(seed)
        if args.net == "mlp":
            act, kw, spread = _activation_spec(args.activation, args, default_a=0.25)
            net = MLP(x[0].numel(), hidden=(args.hidden,), num_classes=len(args.classes),
                      activation=act, activation_kwargs=kw, bias_spread=spread)
        elif args.net == "resnet18_imagenet":
            net = ResNet18ImageNet(len(args.classes), width=args.width, in_channels=x.shape[1])
        else:
            net = build_net(args.net, len(args.classes), width=args.width, batchnorm=False,
                            in_channels=x.shape[1])
        frame, pairs = el.track_elasticity(
            net, x, y, x[probe], y[probe], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, every=args.every, schedule=args.schedule, x_test=xt, y_test=yt,
            seed=seed, checkpoint=os.path.join(work, f"run{r}_checkpoint.pt"), return_pairs=True,
            progress=progress)
        np.savez_compressed(pairs_path, labels=y[probe].numpy(), **pairs)
        frame.to_csv(csv_path, index=False)
        print(f"run {r}: wrote {csv_path} ({len(frame)} records), final test accuracy "
              f"{frame['test_acc'].iloc[-1]:.3f}")
        frames.append(frame)
        pairs_last.append(dict(np.load(pairs_path)))
    if args.run_ids is not None:   # summarise every complete run of --out, not only these
        import pandas as pd

        frames, pairs_last = [], []
        for r in range(args.runs):
            csv_path = os.path.join(args.out, f"run{r}_tracking.csv")
            pairs_path = os.path.join(work, f"run{r}_pairs.npz")
            if os.path.exists(csv_path) and os.path.exists(pairs_path):
                frames.append(pd.read_csv(csv_path))
                pairs_last.append(dict(np.load(pairs_path)))
        if len(frames) < args.runs:
            print(f"{len(frames)} of {args.runs} runs complete; summary written when all are")
            return 0
    summary = _tracking_summary(frames, pairs_last, args.bootstrap, args.seed)
    summary["protocol"] = {k: getattr(args, k) for k in (
        "net", "width", "hidden", "activation", "elephant_a", "elephant_d", "bias_spread", "classes", "per_class",
        "probes", "epochs", "batch_size", "lr", "weight_decay", "every", "schedule", "augment",
        "normalize", "runs", "seed")}
    with open(os.path.join(args.out, "tracking_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for m, v in summary["measures"].items():
        print(f"{m:12s} frac {v['frac_same_exceeds']['mean']:.3f} +- {v['frac_same_exceeds']['sd']:.3f} "
              f"(chance {v['frac_chance']:.3f}); last-epoch ratio {v['last_epoch_ratio']['mean']:.3f} "
              f"+- {v['last_epoch_ratio']['sd']:.3f}; double log-ratio last epoch "
              f"{v['double_log_ratio_last_epoch']['mean']:+.3f} +- {v['double_log_ratio_last_epoch']['sd']:.3f}")
    figures.plot_tracking_statistics(frames, [str(c) for c in args.classes],
                                     os.path.join(args.out, "tracking.png"))
    figures.plot_elasticity_tracking(frames[0], [str(c) for c in args.classes],
                                     os.path.join(args.out, "tracking_curves_run0.png"))
    print(f"wrote {args.out}/tracking_summary.json, tracking.png and tracking_curves_run0.png "
          f"(each with .pdf, .svg beside it)")
    return 0


def _tracking_summary(frames, pairs, n_boot, seed) -> dict:
    """Per measure: the mean and sd over runs of each tracking_summary number, and the bootstrap
    band over probes of the last record's double log-ratio, per run."""
    import numpy as np

    from . import elasticity as el

    out = {"runs": len(frames), "records": [int(len(f)) for f in frames], "measures": {}}
    measures = [m for m in el.TRACK_MEASURES if f"{m}_0_0" in frames[0].columns]
    for m in measures:
        per_run = [el.tracking_summary(f, m) for f in frames]
        entry = {"frac_chance": per_run[0]["frac_chance"]}
        for key in ("frac_same_exceeds", "last_epoch_ratio", "double_log_ratio_first",
                    "double_log_ratio_last_epoch"):
            vals = np.array([p[key] for p in per_run])
            entry[key] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                          "runs": vals.tolist()}
        entry["frac_per_class"] = [p["frac_per_class"] for p in per_run]
        entry["last_record_band"] = [
            el.locality_band(p[m][-1], p["labels"], n_boot=n_boot, seed=seed) for p in pairs if m in p]
        # bootstrap over the probes of the last epoch's mean double log-ratio (the same resampled
        # probes at every record of the epoch), per run: (estimate, 2.5%, 97.5%)
        bands = []
        for f, p in zip(frames, pairs):
            if m not in p:
                continue
            ep = f["epoch"].to_numpy()
            last = np.flatnonzero(ep > np.ceil(ep.max()) - 1)
            boot = np.mean([el.locality_statistics(el.bootstrap_class_means(
                p[m][t], p["labels"], n_boot, seed))["double_log_ratio"] for t in last], axis=0)
            est = float(np.mean([el.locality_statistics(el._measure_matrices(f.iloc[[t]], m))[
                "double_log_ratio"][0] for t in last]))
            bands.append([est, float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))])
        entry["double_log_ratio_last_epoch_band"] = bands
        out["measures"][m] = entry
    out["final_test_acc"] = [float(f["test_acc"].iloc[-1]) for f in frames]
    out["final_train_acc"] = [float(f["train_acc"].iloc[-1]) for f in frames]
    return out


def _elasticity_compare(args, write_csv) -> int:
    """Record-by-record comparison of the runs in --out with Dan et al.'s released curves."""
    import glob
    import os

    import numpy as np
    import pandas as pd

    from . import elasticity as el
    from . import figures

    paths = sorted(glob.glob(os.path.join(args.out, "run*_tracking.csv")))
    frames = [pd.read_csv(p) for p in paths]
    if args.partial:   # the records so far of runs still without their CSV, from their checkpoints
        import torch

        work = args.work or os.path.join("runs", "elasticity", os.path.basename(os.path.normpath(args.out)))
        done = {os.path.basename(p).split("_")[0] for p in paths}
        for ck in sorted(glob.glob(os.path.join(work, "run*_checkpoint.pt"))):
            name = os.path.basename(ck).split("_")[0]
            if name in done:
                continue
            rows = torch.load(ck, map_location="cpu", weights_only=True)["rows"]
            if rows:
                frames.append(pd.DataFrame(rows))
                print(f"{name}: {len(rows)} records so far (unfinished, from {ck})")
    if not frames:
        raise SystemExit(f"no run*_tracking.csv in {args.out}: run `lesde elasticity --out {args.out} track` first")
    pairs = [("kl_compat", "kl"), ("suhe_compat", "suhe"), ("kl", None), ("norm_prob", None), ("norm", None)]
    rows = []
    ours_all, refs_all = {}, {}
    for ours, ref in pairs:
        if f"{ours}_0_0" not in frames[0].columns:
            continue
        st = [el.locality_statistics(el._measure_matrices(f, ours)) for f in frames]
        n = max(len(f) for f in frames)   # record t: the runs that reached it (column runs_ours)
        longest = frames[int(np.argmax([len(f) for f in frames]))]
        ours_all[ours] = st
        rst = None
        if ref is not None:
            R = el.read_reference_curves(args.reference, "cifar10", ref)   # [runs, T, K, K]
            rst = el.locality_statistics(R)
            refs_all[ref] = rst
            n = min(n, R.shape[1])
        for t in range(n):
            reached = [s for s, f in zip(st, frames) if len(f) > t]
            row = {"ours": ours, "reference": ref or "-", "record": t, "step": int(longest["step"].iloc[t]),
                   "epoch": float(longest["epoch"].iloc[t]), "runs_ours": len(reached)}
            for name, key in (("frac", "frac_same_exceeds"), ("ratio", "ratio"), ("dlr", "double_log_ratio")):
                v = np.array([s[key][t].mean() if key == "frac_same_exceeds" else s[key][t] for s in reached])
                row[f"{name}_ours"] = round(float(v.mean()), 4)
                row[f"{name}_ours_sd"] = round(float(v.std(ddof=1)), 4) if len(v) > 1 else 0.0
                if rst is not None:
                    w = rst[key][:, t].mean(-1) if key == "frac_same_exceeds" else rst[key][:, t]
                    row[f"{name}_ref"] = round(float(w.mean()), 4)
                    row[f"{name}_ref_sd"] = round(float(w.std(ddof=1)), 4)
            rows.append(row)
    write_csv("dan_comparison.csv", rows)
    table = pd.DataFrame(rows)
    table["epoch_index"] = np.floor(table["epoch"] - 1e-9).clip(lower=0).astype(int)
    agg = table.groupby(["ours", "reference", "epoch_index"]).mean(numeric_only=True).reset_index()
    agg = agg.drop(columns=["record", "step", "epoch"]).round(4)
    write_csv("dan_comparison_by_epoch.csv", agg.to_dict("records"))
    metrics = os.path.join(os.path.dirname(args.reference), "metrics_cifar10.csv")
    if os.path.exists(metrics):   # accuracies per epoch beside theirs
        ref = pd.read_csv(metrics)
        acc_rows = []
        for e in sorted(ref["index"].unique()):
            theirs = ref[ref["index"] == e]
            ours_train, ours_test = [], []
            for f in frames:
                ep = np.floor(f["epoch"].to_numpy() - 1e-9).clip(min=0)
                sel = f[ep == e]
                if len(sel):
                    ours_train.append(float(sel["train_acc"].mean()))
                    if sel["test_acc"].notna().any():
                        ours_test.append(float(sel["test_acc"].dropna().iloc[-1]))
            acc_rows.append({
                "epoch_index": int(e),
                "train_acc_ours": round(float(np.mean(ours_train)), 4) if ours_train else float("nan"),
                "train_acc_ours_sd": round(float(np.std(ours_train, ddof=1)), 4) if len(ours_train) > 1 else 0.0,
                "train_acc_ref": round(float(theirs["train_acc"].mean()), 4),
                "train_acc_ref_sd": round(float(theirs["train_acc"].std(ddof=1)), 4),
                "heldout_test_acc_ours": round(float(np.mean(ours_test)), 4) if ours_test else float("nan"),
                "train_image_acc_ref": round(float(theirs["test_acc"].mean()), 4)})
        write_csv("dan_accuracy.csv", acc_rows)
    figures.plot_dan_comparison(table, os.path.join(args.out, "dan_comparison.png"))
    print(f"wrote {os.path.join(args.out, 'dan_comparison.png')} (and .pdf, .svg beside it)")
    return 0


# --------------------------------------------------------------------------------------------
# subcommands (training real networks with tracked trajectories)
# --------------------------------------------------------------------------------------------
@_subcommand
def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a network and log tracked features/logits to a trajectory store",
        description="Train a network on CIFAR-10 classes or GeoMNIST with SGD or Adam and log, "
        "every --log-every steps, the penultimate features and logits of m tracked samples per "
        "class (train and test), train/test loss and accuracy, and optionally the measured "
        "impact matrix, to a resumable Zarr store. Running the same command again resumes.",
    )
    p.add_argument("store", help="directory of the trajectory store (created, or resumed)")
    p.add_argument("--config", default=None,
                   help="TrainConfig JSON file; when given, the run options below are ignored")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=("cifar10", "geomnist"), default="cifar10",
                   help="data set: CIFAR-10 (needs --data-path or $LESDE_CIFAR10) or GeoMNIST (generated)")
    d.add_argument("--data-path", default=None,
                   help="CIFAR-10 zip, image folder or python batches (default: $LESDE_CIFAR10)")
    d.add_argument("--classes", nargs="+", default=["airplane", "automobile", "bird"],
                   help="CIFAR-10 class names or indices")
    d.add_argument("--per-class", type=int, default=2500, help="train images per class")
    d.add_argument("--test-per-class", type=int, default=None,
                   help="test images per class (default: all; GeoMNIST: 500)")
    d.add_argument("--p-err", type=float, default=0.0, help="GeoMNIST label-noise level")
    d.add_argument("--geomnist-variant", choices=("zhang2021", "analytic"), default="zhang2021",
                   help="GeoMNIST generator: zhang2021, the authors' (train and test are a random "
                   "split of one sweep, label noise on train only), or analytic, the earlier one")
    d.add_argument("--data-seed", type=int, default=0,
                   help="seed of the data subset, the GeoMNIST sweep and its label noise")
    r = p.add_argument_group("run")
    r.add_argument("--net", default="resnet18", choices=("resnet18", "resnet20", "lenet", "mlp"),
                   help="network of lesde.nets")
    r.add_argument("--width", type=float, default=None, help="ResNet width factor")
    r.add_argument("--net-kwargs", default="{}", help="extra build_net kwargs as JSON")
    r.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="optimizer")
    r.add_argument("--lr", type=float, default=0.02,
                   help="learning rate h (constant); the logged time is t = step x h")
    r.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    r.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    r.add_argument("--batch-size", type=int, default=128, help="mini-batch size")
    r.add_argument("--sampling", choices=("reshuffle", "replacement"), default="reshuffle",
                   help="samples per epoch by reshuffling, or drawn uniformly with replacement")
    length = r.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (give --steps or --epochs; default: 1 epoch)")
    length.add_argument("--epochs", type=float, default=None,
                        help="epochs, may be fractional (instead of --steps)")
    r.add_argument("--log-every", type=int, default=10,
                   help="log the tracked samples every this many steps (also at the first and last)")
    r.add_argument("--track", type=int, default=100, help="tracked train samples per class")
    r.add_argument("--track-test", type=int, default=100, help="tracked test samples per class")
    r.add_argument("--eval-train", type=int, default=0,
                   help="train-metric subset size (0: tracked only, -1: all)")
    r.add_argument("--eval-test", type=int, default=-1,
                   help="test-metric subset size (0: tracked only, -1: all)")
    r.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    r.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision of the network")
    r.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    r.add_argument("--checkpoint-every", type=int, default=0,
                   help="checkpoint every this many steps (0: only at the end); a rerun resumes")
    r.add_argument("--impacts-every", type=int, default=0,
                   help="measure the impact matrix E on the network every this many steps (0: never)")
    r.add_argument("--impacts-per-class", type=int, default=0,
                   help="tracked train samples per class used to measure E (0: all tracked)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args):
    import json
    import os

    import torch

    from . import data as _data
    from .resources import check_device
    from .tracking import TrainConfig, _build_model, _is_lesde_dir, train_and_track

    # everything that can be checked is checked before the data are loaded
    _check_args(args, per_class="pos_int", test_per_class="pos_int", p_err="fraction",
                data_seed="nonneg_int", width="pos_float", lr="pos_float",
                momentum="nonneg_float", weight_decay="nonneg_float", batch_size="pos_int",
                steps="pos_int", epochs="pos_float", log_every="pos_int", track="pos_int",
                track_test="nonneg_int", seed="nonneg_int", checkpoint_every="nonneg_int",
                impacts_every="nonneg_int", impacts_per_class="nonneg_int")
    if args.data == "cifar10":
        path = args.data_path or os.environ.get("LESDE_CIFAR10", "")
        if not path:
            raise ValueError("no CIFAR-10 location: give --data-path or set LESDE_CIFAR10")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data-path: CIFAR-10 path does not exist: {path}")
        classes = [int(c) if c.isdigit() else c for c in args.classes]
        try:
            labels = _data._resolve_classes(classes)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None
        names = [_data.CIFAR10_CLASSES[c] for c in labels]
        in_channels, in_dim = 3, 3 * 32 * 32
    else:
        names = list(_data.GEOMNIST_CLASSES)
        in_channels, in_dim = 1, 32 * 32
    if args.config:
        try:
            with open(args.config) as fh:
                config = TrainConfig.from_json(fh.read())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--config {args.config}: not a valid TrainConfig JSON file ({exc})") from None
        if config.num_classes != len(names):
            raise ValueError(f"--config {args.config}: num_classes = {config.num_classes}, but the "
                             f"data have {len(names)} classes")
    else:
        try:
            net_kwargs = json.loads(args.net_kwargs)
        except ValueError as exc:
            raise ValueError(f"--net-kwargs must be a JSON object, e.g. '{{\"width\": 0.5}}' ({exc})") from None
        if not isinstance(net_kwargs, dict):
            raise ValueError(f"--net-kwargs must be a JSON object, got {args.net_kwargs!r}")
        if args.net.startswith("resnet"):
            net_kwargs.setdefault("in_channels", in_channels)
            if args.width is not None:
                net_kwargs.setdefault("width", args.width)
        elif args.net == "lenet":
            net_kwargs.setdefault("in_channels", in_channels)
        elif args.net == "mlp":
            net_kwargs.setdefault("in_dim", in_dim)
        steps, epochs = args.steps or 0, args.epochs or 0.0
        if args.steps is None and args.epochs is None:
            epochs = 1.0
        config = TrainConfig(
            net=args.net, num_classes=len(names), net_kwargs=net_kwargs,
            optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, batch_size=args.batch_size, steps=steps,
            epochs=epochs, log_every=args.log_every, track_per_class=args.track,
            track_test_per_class=args.track_test, eval_train_size=args.eval_train,
            eval_test_size=args.eval_test, seed=args.seed, dtype=args.dtype,
            device=args.device, checkpoint_every=args.checkpoint_every,
            impacts_every=args.impacts_every, impacts_per_class=args.impacts_per_class,
            class_names=tuple(str(n) for n in names), sampling=args.sampling,
        )
    check_device(config.device, "--device")
    _build_model(config, device="cpu")  # the network's arguments, before loading data
    if os.path.exists(args.store) and not _is_lesde_dir(args.store):
        raise ValueError(f"store {args.store} exists and is not a lesde trajectory store; use "
                         "another path")
    if not (os.path.isdir(args.store) and os.listdir(args.store)):  # a new store
        _check_out(args.store, "store", directory=True)
    elif os.path.exists(os.path.join(args.store, "zarr.json")):  # resuming: same config?
        from .tracking import PartialStoreError, TrajectoryStore, _config_diff

        try:
            have = TrajectoryStore.open(args.store, mode="r", verify=False).config
        except PartialStoreError:
            have = config
        if have != config:
            raise ValueError(f"store {args.store} holds a run with a different config "
                             f"({_config_diff(have, config)}); use another store path")
    if args.data == "cifar10":
        train = _data.load_cifar10(path, "train", classes=labels, per_class=args.per_class,
                                   seed=args.data_seed, as_tensor=True)
        test = _data.load_cifar10(path, "test", classes=labels, per_class=args.test_per_class,
                                  seed=args.data_seed, as_tensor=True)
    else:
        if args.geomnist_variant == "zhang2021":
            g_tr, g_te = _data.geomnist_train_val(args.per_class, args.test_per_class or 500,
                                                  seed=args.data_seed, p_err=args.p_err)
        else:
            g_tr = _data.make_geomnist(args.per_class, seed=args.data_seed, p_err=args.p_err,
                                       variant="analytic")
            g_te = _data.make_geomnist(args.test_per_class or 500, seed=args.data_seed + 1,
                                       variant="analytic")
        train = (torch.from_numpy(g_tr.images), torch.from_numpy(g_tr.labels))
        test = (torch.from_numpy(g_te.images), torch.from_numpy(g_te.clean_labels))
    store = train_and_track(config, train, test, args.store, progress=not args.no_progress)
    m = store.metrics()
    print(f"{store.path}: T={len(store)} logged times, step {int(m['step'][-1])}, "
          f"train_acc {m['train_acc'][-1]:.4f}, test_acc {m['test_acc'][-1]:.4f}")
    print(f"final: train loss {m['train_loss'][-1]:.4g}, accuracy {m['train_acc'][-1]:.4f}; test loss "
          f"{m['test_loss'][-1]:.4g}, accuracy {m['test_acc'][-1]:.4f} (chance {1 / len(names):.3f}, "
          f"K = {len(names)} classes)")
    print(f"wrote {store.path} (trajectory store: tracked features and logits, metrics, "
          "checkpoint)")
    return 0


# --------------------------------------------------------------------------------------------
# subcommands (published protocols: several tracked trials each)
# --------------------------------------------------------------------------------------------
@_subcommand
def _add_reproduce(sub):
    p = sub.add_parser(
        "reproduce",
        help="run a published training protocol (several tracked trials per setting)",
        description="Run or resume the trials of a named protocol (lesde.protocols): e.g. "
        "zhang2021-geomnist (LeNet float64, SGD batch 1, lr 0.005, 10,000 iterations, p_err 0, "
        "0.3, 2/3) or zhang2021-cifar10 (three classes, lr 0.001, 30,000 iterations). Every "
        "trial is a resumable trajectory store OUT/<setting>/trial_<i>; running the same "
        "command again continues the unfinished trials. --list shows the protocols.",
    )
    p.add_argument("protocol", nargs="?", help="protocol name (see --list)")
    p.add_argument("out", nargs="?", help="run directory (created, or resumed)")
    p.add_argument("--list", action="store_true", help="list the protocols and exit")
    p.add_argument("--trials", type=int, default=None,
                   help="trials per setting (default: the protocol's); trial i has seed i")
    p.add_argument("--p-err", type=float, nargs="+", default=None,
                   help="settings to run (GeoMNIST label noise; default: the protocol's)")
    p.add_argument("--workers", type=int, default=1, help="trials run at once (processes)")
    p.add_argument("--scheduler", default=None,
                   help="address of a Dask scheduler to run the trials on instead")
    p.add_argument("--data-path", default=None, help="CIFAR-10 location (default: $LESDE_CIFAR10)")
    p.add_argument("--summary", default=None, metavar="DIR",
                   help="afterwards write the small outputs (per-setting summaries, tables, "
                   "figure) to DIR")
    p.add_argument("--summary-only", action="store_true",
                   help="write the summary of the finished trials without training")
    p.add_argument("--nc", action="store_true",
                   help="summary: NC1-NC4 of the tracked features over training (needs the "
                   "recorded read-out, e.g. cifar10-resnet18-k10)")
    o = p.add_argument_group("overrides (short checks; stored with the run)")
    o.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the protocol's)")
    o.add_argument("--log-every", type=int, default=None,
                   help="log every this many steps (default: the protocol's)")
    o.add_argument("--train-per-class", type=int, default=None,
                   help="training images per class (default: the protocol's)")
    o.add_argument("--val-per-class", type=int, default=None,
                   help="validation images per class (default: the protocol's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_reproduce)


def _run_reproduce(args):
    import os
    import time

    from . import protocols as pr

    if args.list:
        for name, proto in pr.PROTOCOLS.items():
            print(f"{name}: {proto.description}; {proto.trials} trial(s) per setting by default "
                  f"(publication: {proto.paper_trials or '-'})")
        return 0
    if not args.protocol or not args.out:
        raise ValueError("give a protocol name and a run directory (or --list)")
    overrides = {k: v for k, v in (("steps", args.steps), ("log_every", args.log_every),
                                   ("train_per_class", args.train_per_class),
                                   ("val_per_class", args.val_per_class)) if v is not None}
    if not args.summary_only:
        client = None
        if args.scheduler:
            from distributed import Client

            client = Client(args.scheduler)
        t0 = time.perf_counter()
        recs = pr.run_protocol(args.protocol, args.out, trials=args.trials, p_errs=args.p_err,
                               workers=args.workers, client=client, data_path=args.data_path,
                               threads=args.threads, progress=not args.no_progress,
                               **overrides)
        wall = time.perf_counter() - t0
        for r in recs:
            f = r["final"]
            print(f"{r['store']}: test_acc {f['test_acc']:.4f} test_loss {f['test_loss']:.4f} "
                  f"({r['wall_seconds']:.0f} s)")
        print(f"{len(recs)} trials; this session {wall:.0f} s")
    if args.summary or args.summary_only:
        dest = args.summary or os.path.join(args.out, "summary")
        files = pr.write_protocol_summary(args.out, dest, nc=args.nc)
        print(f"wrote {len(files)} files to {dest}:")
        for f in files:
            print(f"  {f}")
    return 0


_RECONCILE_VARIANTS = {
    "as-trained": {},
    "no-momentum": {"momentum": False},
    "bn-eval": {"batchnorm_train": False},
    "no-momentum-bn-eval": {"momentum": False, "batchnorm_train": False},
    "lr/10": {"lr_scale": 0.1},
}


@_subcommand
def _add_reconcile(sub):
    p = sub.add_parser(
        "reconcile",
        help="measured vs fitted impacts: SGD's drift over log intervals from a trial's state",
        description="From the state of a protocol trial at a step (a kept snapshot, or the trial "
        "run again to that step), compare over intervals of SGD steps: the impacts measured on "
        "the network, its first-order drift, the kernel flow (NTK frozen), the cross-entropy "
        "LE-SDE with the measured E, and replicas of real SGD (variants without momentum or "
        "with BatchNorm in evaluation mode), each summarised by the intra/inter impacts a "
        "left-rule fit of the increments would give (lesde.reconcile).",
    )
    p.add_argument("run", help="protocol run directory (lesde reproduce)")
    p.add_argument("--setting", default="p000", help="setting, e.g. p000, p030, p067")
    p.add_argument("--trial", type=int, default=0, help="trial of the setting")
    p.add_argument("--step", type=int, required=True, help="optimizer step of the state")
    p.add_argument("--intervals", default="1,5,20,50",
                   help="comma list of interval lengths in SGD steps (default %(default)s)")
    p.add_argument("--replicas", type=int, default=200, help="SGD replicas per variant")
    p.add_argument("--probe-per-class", type=int, default=30,
                   help="tracked training samples per class used as probes")
    p.add_argument("--variants", nargs="+", default=["as-trained"],
                   choices=sorted(_RECONCILE_VARIANTS), help="SGD variants")
    p.add_argument("--data-path", default=None, help="CIFAR-10 location (default: $LESDE_CIFAR10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the SGD replicas and the LE-SDE paths")
    p.add_argument("--out", required=True, help="directory for the CSV / JSON / markdown")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_run_reconcile)


def _run_reconcile(args):
    import csv
    import json
    import os
    import time

    import numpy as np
    import torch

    from .protocols import protocol_state
    from .reconcile import compare_interval
    from .tracking import load_store

    intervals = sorted({int(v) for v in str(args.intervals).split(",") if v.strip()})
    if not intervals or intervals[0] < 1:
        raise ValueError(f"--intervals must be positive step counts, got {args.intervals!r}")
    t0 = time.perf_counter()
    model, opt, (train, _), info = protocol_state(args.run, args.setting, args.trial, args.step,
                                                  data_path=args.data_path)
    cfg = info["config"]
    store = os.path.join(args.run, args.setting, f"trial_{args.trial:03d}")
    st = load_store(store)
    sel = np.flatnonzero(st.split == 0)
    lab = st.labels[sel]
    probe = np.concatenate([sel[lab == c][: args.probe_per_class]
                            for c in range(cfg.num_classes)])
    x_tr = train[0].to(cfg.torch_dtype)
    x_probe = x_tr[torch.as_tensor(st.index[probe])]
    y_probe = torch.as_tensor(st.labels[probe])
    variants = {v: _RECONCILE_VARIANTS[v] for v in args.variants}
    res = compare_interval(model, opt, x_tr, train[1], x_probe, y_probe, intervals,
                           replicas=args.replicas, batch_size=cfg.batch_size,
                           replacement=cfg.sampling == "replacement", sgd_variants=variants,
                           seed=args.seed, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{os.path.basename(os.path.normpath(args.run))}_"
                                  f"{args.setting}_trial{args.trial}_step{args.step}")
    rows = res.rows()
    with open(base + ".csv", "w", newline="") as f:
        keys = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    dec = [res.decomposition(n, v, q) for v in variants for n in intervals
           for q in ("contrast", "alpha")]
    with open(base + ".json", "w") as f:
        json.dump({"run": os.path.basename(os.path.normpath(args.run)), "setting": args.setting,
                   "trial": args.trial, "step": args.step, "lr": res.lr,
                   "state_source": info["source"], "max_logit_diff": info["max_logit_diff"],
                   "probe_per_class": args.probe_per_class, "replicas": args.replicas,
                   "alpha_hat": res.alpha_hat, "beta_hat": res.beta_hat,
                   "E_hat": np.asarray(res.E_hat).tolist(), "wall_seconds": wall,
                   "decomposition": dec}, f, indent=1)
    lines = [f"state: {args.run} {args.setting} trial {args.trial} step {args.step} "
             f"({info['source']}); alpha_hat {res.alpha_hat:.4g}, beta_hat {res.beta_hat:.4g}",
             "", "| variant | steps | quantity | measured | first-order drift (probe / whole "
             "set) | kernel flow | class-pair flow | SGD [95%] | total gap [95%] | form | time "
             "scale | rest [95%] |",
             "|---|---:|---|---:|---|---:|---:|---|---|---:|---:|---|"]
    for d in dec:
        lines.append(
            f"| {d['variant']} | {d['steps']} | {d['quantity']} | {d['measured']:.4g} | "
            f"{d['kernel@0']:.4g} / {d['full_set@0']:.4g} | {d['kernel_flow']:.4g} | "
            f"{d['class_pair_flow']:.4g} | "
            f"{d['sgd']:.4g} [{d['sgd_lo']:.3g}, {d['sgd_hi']:.3g}] | {d['total']:.3g} "
            f"[{d['total_band'][0]:.3g}, {d['total_band'][1]:.3g}] | {d['form']:.3g} | "
            f"{d['time_scale']:.3g} | {d['rest']:.3g} [{d['rest_band'][0]:.3g}, "
            f"{d['rest_band'][1]:.3g}] |")
    text = "\n".join(lines) + "\n"
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {base}.csv, .json, .md ({wall:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------
# subcommands (fitting the SDE to logged training)
# --------------------------------------------------------------------------------------------
_FIT_ESTIMATORS = ("shooting", "i", "l", "regression")


@_subcommand
def _add_fit(sub):
    p = sub.add_parser(
        "fit",
        help="fit the LE-SDE to a log: a trajectory store, a lesde simulate file or an .npz",
        description="Fit the impacts E(t) of the LE-SDE to logged per-sample trajectories by "
        "trajectory matching (multiple shooting, the default), with the noise (additive sigma(t) "
        "and the SGD noise's learning rate) and bands; optionally the closed-form I/L "
        "estimators and the windowed regression beside it; a held-out model comparison (I, L, "
        "cross-entropy, cross-entropy + additive noise); both tail indices of A(t). Prints "
        "alpha, beta with bands and the model table; writes CSV, JSON and figures to --out.",
    )
    p.add_argument("log", nargs="+",
                   help="a trajectory store directory, a `lesde simulate` solution (.npz), or an "
                   ".npz with features (T, N, p) or (R, T, N, p), labels (N,) and ts (T,); "
                   "several logs (same times and tracked labels) are fitted as independent trials")
    p.add_argument("--out", default="fit_out", help="output directory")
    d = p.add_argument_group("data")
    d.add_argument("--what", choices=("logits", "features"), default="logits",
                   help="which logged array is X (stores; .npz: the array of this name, else "
                   "'features'; default logits)")
    d.add_argument("--split", choices=("train", "test", "all"), default="train",
                   help="which tracked samples (default train)")
    d.add_argument("--lr", type=float, default=None,
                   help="the run's learning rate, to count time in SGD iterations for the "
                   "paper's tail index (default: a store's config; .npz: the lr-scaled time is "
                   "read as is)")
    m = p.add_argument_group("model (trajectory matching)")
    m.add_argument("--field", default=None,
                   help="drift field: identity, label_projection, cross_entropy (default: the "
                   "drift of a lesde simulate file; else cross_entropy when p = K, else identity)")
    m.add_argument("--matrix", choices=("intra_inter", "full"), default="intra_inter",
                   help="intra_inter: E = (alpha - beta) I + beta 11^T; full: a K x K matrix")
    m.add_argument("--time", choices=("piecewise_linear", "constant", "power_law"),
                   default="piecewise_linear", help="how E depends on t (default piecewise_linear)")
    m.add_argument("--knots", default=None,
                   help="piecewise-linear knots: a number (equally spaced, default 21, fewer on "
                   "logs of under 41 logged times) or a comma list of times")
    m.add_argument("--t0", type=float, default=1.0, help="time scale of the power law")
    m.add_argument("--noise", choices=("both", "additive", "sgd", "none"), default="both",
                   help="noise model of the weights and the parametric bootstrap (default both)")
    b = p.add_argument_group("bands")
    b.add_argument("--bootstrap", default="auto",
                   choices=("auto", "sandwich", "parametric", "samples", "trials", "both", "none"),
                   help="band method (default auto: parametric bootstrap when --n-bootstrap > 0)")
    b.add_argument("--n-bootstrap", type=int, default=200, help="bootstrap resamples")
    b.add_argument("--interval", choices=("basic", "percentile", "normal"), default="basic",
                   help="bootstrap interval: basic (2 theta - quantiles), percentile, or normal")
    b.add_argument("--level", type=float, default=0.95, help="level of the bands")
    b.add_argument("--jobs", type=int, default=1, help="processes for the bootstrap refits")
    b.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                   help="run the bootstrap refits on this Dask scheduler")
    o = p.add_argument_group("other estimators and checks")
    o.add_argument("--estimators", default="shooting",
                   help="comma-separated subset of shooting, i, l, regression (default shooting)")
    o.add_argument("--sg-window", type=float, default=None,
                   help="I/L estimators: width in time units of the local quadratic for "
                   "alpha = dA/dt (default 4 median log intervals)")
    o.add_argument("--reg-window", type=int, default=None,
                   help="regression: increments per window (default max(5, (T-1)//20))")
    o.add_argument("--degree", type=int, default=1, help="regression: degree of E in a window")
    o.add_argument("--quadrature", choices=("trapezoid", "left"), default="trapezoid",
                   help="regression: quadrature rule over a log interval")
    o.add_argument("--on-reversed", choices=("abs", "nan", "raise"), default="abs",
                   help="I/L estimators, a mode turned against its start: abs (its magnitude), "
                   "nan or raise")
    o.add_argument("--tail", type=float, default=0.5,
                   help="log-log tail index: fraction (0, 1] of the log-time range")
    o.add_argument("--tail-iterations", type=float, default=1000.0,
                   help="the paper's tail index: the last this-many SGD iterations")
    o.add_argument("--compare", type=float, default=0.5, metavar="FRACTION",
                   help="held-out model comparison: fit on this fraction of the run, score the "
                   "rest (0: skip; default 0.5)")
    o.add_argument("--compare-paths", type=int, default=50,
                   help="simulated paths per model of the comparison")
    o.add_argument("--gof-paths", type=int, default=0,
                   help="simulate this many paths of each fitted SDE over the whole log (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and simulated paths")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.set_defaults(func=_run_fit)


def _check_fit_args(args) -> list:
    """Every bad argument of ``lesde fit`` is a ValueError before any work starts."""
    names = [s.strip().lower() for s in args.estimators.split(",") if s.strip()]
    unknown = sorted(set(names) - set(_FIT_ESTIMATORS))
    if unknown or not names:
        raise ValueError(f"--estimators: unknown {unknown or 'empty'}; use "
                         f"{', '.join(_FIT_ESTIMATORS)}")
    checks = [
        (0 < args.tail <= 1, f"--tail must be a fraction in (0, 1], got {args.tail}"),
        (args.tail_iterations > 0,
         f"--tail-iterations must be positive, got {args.tail_iterations}"),
        (args.n_bootstrap >= 0, f"--n-bootstrap must be >= 0, got {args.n_bootstrap}"),
        (0 < args.level < 1, f"--level must be in (0, 1), got {args.level}"),
        (args.jobs >= 1, f"--jobs must be >= 1, got {args.jobs}"),
        (args.gof_paths == 0 or args.gof_paths >= 2,
         f"--gof-paths must be 0 or >= 2, got {args.gof_paths}"),
        (args.compare == 0 or 0 < args.compare < 1,
         f"--compare must be 0 or a fraction in (0, 1), got {args.compare}"),
        (args.compare_paths >= 2, f"--compare-paths must be >= 2, got {args.compare_paths}"),
        (args.t0 > 0, f"--t0 must be positive, got {args.t0}"),
        (args.sg_window is None or args.sg_window > 0,
         f"--sg-window must be a positive width in time units, got {args.sg_window}"),
        (args.reg_window is None or args.reg_window >= 1,
         f"--reg-window must be >= 1, got {args.reg_window}"),
        (args.degree >= 0, f"--degree must be >= 0, got {args.degree}"),
        (args.lr is None or args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (not (args.bootstrap in ("samples", "trials", "both", "parametric")
              and args.n_bootstrap < 2),
         f"--bootstrap {args.bootstrap} needs --n-bootstrap >= 2"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    if args.knots is not None:
        try:
            vals = [float(v) for v in str(args.knots).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--knots must be a number or a comma list of times, got "
                             f"{args.knots!r}") from None
        if not vals or (len(vals) == 1 and (vals[0] < 1 or vals[0] != int(vals[0]))):
            raise ValueError(f"--knots must be a positive integer or a list of times, got "
                             f"{args.knots!r}")
        args.knots = int(vals[0]) if len(vals) == 1 else vals
    return names


def _run_fit(args):
    import csv
    import json
    import os
    import warnings

    import numpy as np

    from . import fit as lf
    from .storage import atomic_write

    names = _check_fit_args(args)

    def write_csv(name, columns):
        keys = list(columns)
        rows = np.column_stack([np.asarray(columns[k], dtype=float) for k in keys])
        path = os.path.join(args.out, name)
        with atomic_write(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            w.writerows(rows.tolist())
        written.append(path)

    def clean(v):  # strict JSON: NaN / inf -> null
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.ndarray):
            return clean(v.tolist())
        if isinstance(v, (float, np.floating)):
            return float(v) if np.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v

    from .tracking import load_store

    stores = [load_store(p) if os.path.isdir(p) else None for p in args.log]
    srcs = [s if s is not None else p for s, p in zip(stores, args.log)]
    traj = lf.as_trajectory(srcs if len(srcs) > 1 else srcs[0], what=args.what, split=args.split)
    store = stores[0]
    client = None
    if args.dask_scheduler:
        from distributed import Client

        client = Client(args.dask_scheduler)
    field = (args.field or _simulated_field(args.log)
             or ("cross_entropy" if traj.p == traj.K else "identity"))
    os.makedirs(args.out, exist_ok=True)
    written = []
    run_name = "+".join(os.path.splitext(os.path.basename(os.path.normpath(p)))[0]
                        for p in args.log)
    lr_run = args.lr if args.lr is not None else (store.config.lr if store is not None else None)
    summary = {"log": run_name, "store": run_name, "trials": traj.R, "what": args.what,
               "split": args.split, "T": traj.T, "N": traj.N, "p": traj.p, "K": traj.K,
               "field": field, "n_bootstrap": args.n_bootstrap, "seed": args.seed,
               "level": args.level, "estimators": {}}
    print(f"lesde fit: {run_name}: {traj!r}, {field} drift")
    fitted = {}
    for name in names:
        if name == "l" and traj.p != traj.K:
            print(f"lesde fit: skipping the L-estimator (p = {traj.p} != K = {traj.K})")
            continue
        if name == "shooting":
            est = lf.ShootingEstimator(
                field, matrix=args.matrix, time=args.time, knots=args.knots, t0=args.t0,
                noise=args.noise, bootstrap=args.bootstrap, n_bootstrap=args.n_bootstrap,
                interval=args.interval, level=args.level, seed=args.seed, n_jobs=args.jobs,
                client=client).fit(traj)
            write_csv("shooting.csv", est.results())
            info = est.summary()
            info["alpha"], info["beta"], info["gap"] = est.alpha_, est.beta_, est.gap_
            info["row_shift_identified"] = bool(est.row_shift_identified_)
            for k in ("alpha", "beta", "gap", "A", "B"):
                if k in est.bands_:
                    info[f"{k}_band"] = est.bands_[k]
            info["A_final"], info["B_final"] = float(est.A_[-1]), float(est.B_[-1])
            info["sigma"], info["lr_fitted"] = est.sigma_, est.lr_
        elif name in ("i", "l"):
            Est = lf.IEstimator if name == "i" else lf.LEstimator
            est = Est(window=args.sg_window, on_reversed=args.on_reversed,
                      n_bootstrap=args.n_bootstrap, level=args.level, seed=args.seed).fit(traj)
            write_csv(f"{name}_estimator.csv", est.results())
            info = {"A_final": float(est.A_[-1]), "B_final": float(est.B_[-1]),
                    "window": float(est.window_), "reversed_times": int(est.n_reversed_),
                    "fraction_alpha_gt_beta": float(np.mean(est.alpha_ > est.beta_))}
            if est.bands_:  # a band only beside a value: no "A_final": null with a band
                for key, value in (("A", est.A_[-1]), ("B", est.B_[-1])):
                    if np.isfinite(value):
                        info[f"{key}_final_band"] = est.bands_[key][:, -1].tolist()
                    else:
                        info[f"{key}_final_note"] = ("undefined at the last time (a mode turned "
                                                     "against its start, --on-reversed); no band")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                est = lf.RegressionEstimator(field, window=args.reg_window, degree=args.degree,
                                             quadrature=args.quadrature,
                                             n_bootstrap=args.n_bootstrap, level=args.level,
                                             seed=args.seed).fit(traj)
            write_csv("regression.csv", est.results())
            info = {"window": int(est.window_), "alpha": est.alpha_, "beta": est.beta_,
                    "sigma": est.sigma_, "condition_max": float(np.max(est.condition_)),
                    "fraction_alpha_gt_beta": float(np.mean(est.alpha_ > est.beta_))}
        if name in ("shooting", "i", "l"):
            info["tail_index"] = _tail_indices(est, args, lr_run)
        fitted[name] = est
        summary["estimators"][name] = info
    if "shooting" in fitted:
        _print_headline(fitted["shooting"], args.level)
    for name, est in fitted.items():
        if name in ("i", "l"):
            band = est.bands_.get("A")
            txt = f" [{band[0, -1]:.4g}, {band[1, -1]:.4g}]" if band is not None else ""
            print(f"{type(est).__name__}: A(T) = {est.A_[-1]:.4g}{txt}, B(T) = {est.B_[-1]:.4g}")
        if "tail_index" in summary["estimators"].get(name, {}):
            ti = summary["estimators"][name]["tail_index"]
            print(f"{type(est).__name__} tail index of A: " + ", ".join(
                f"{k} {v['r']:.3f}" if isinstance(v, dict) else f"{k}: {v}"
                for k, v in ti.items()))
    measured = None
    if store is not None:
        try:
            measured = store.impacts()
            write_csv("measured_impacts.csv", {"t": measured["time"], "alpha": measured["alpha"],
                                               "beta": measured["beta"]})
            summary["measured_impacts"] = "measured_impacts.csv"
        except ValueError:
            pass
    if args.compare > 0:
        cmp_ = lf.compare_models(traj, fit_fraction=args.compare, n_paths=args.compare_paths,
                                 seed=args.seed,
                                 estimator_kwargs={"matrix": args.matrix, "time": args.time,
                                                   "knots": args.knots, "t0": args.t0})
        summary["model_comparison"] = {"t_split": cmp_.t_split, "rows": cmp_.rows}
        path = os.path.join(args.out, "model_table.md")
        with atomic_write(path, "w") as fh:
            fh.write(str(cmp_) + "\n")
        written.append(path)
        print(str(cmp_))
    from .figures import plot_fit, plot_goodness_of_fit

    class_names = store.class_names if store is not None else None
    if fitted:
        path = plot_fit(traj.ts, fitted, measured, os.path.join(args.out, "fit.png"),
                        title=f"{run_name}: {args.what} of the tracked {args.split} samples")
        written.append(path)
        summary["figures"] = ["fit.png"]
    if args.gof_paths > 0:
        summary["goodness_of_fit"] = {}
        primary = next(n for n in ("shooting", "regression", "i", "l") if n in fitted)
        for name, est in fitted.items():
            if name in ("i", "l") and not np.isfinite(est.alpha_).any():
                continue
            gof = lf.goodness_of_fit(traj, est, n_paths=args.gof_paths, seed=args.seed,
                                     level=args.level)
            summary["goodness_of_fit"][name] = gof.summary()
            npz = os.path.join(args.out, f"gof_{name}.npz")
            with atomic_write(npz, "wb") as fh:
                np.savez_compressed(fh, ts=gof.ts, logged_means=gof.logged_means,
                                    sim_means=gof.sim_means, sim_lo=gof.sim_lo,
                                    sim_hi=gof.sim_hi, logged_spread=gof.logged_spread,
                                    sim_spread=gof.sim_spread,
                                    logged_accuracy=gof.logged_accuracy,
                                    sim_accuracy=gof.sim_accuracy)
            written.append(npz)
            png = "goodness_of_fit.png" if name == primary else f"goodness_of_fit_{name}.png"
            written.append(plot_goodness_of_fit(
                gof, os.path.join(args.out, png), class_names=class_names,
                title=f"{run_name}: {type(est).__name__} ({gof.model['field']} drift, "
                f"{gof.model['noise']} noise)"))
            summary.setdefault("figures", []).append(png)
    path = os.path.join(args.out, "summary.json")
    with atomic_write(path, "w") as f:
        json.dump(clean(summary), f, indent=2)
    written.append(path)
    if client is not None:
        client.close()
    print("lesde fit: wrote")
    for pth in written:
        print(f"  {pth}")
    return 0


def _simulated_field(logs):
    """The drift a `lesde simulate` solution file was made with (None for anything else), so
    that `lesde fit` on such a file fits the model that made it unless --field says otherwise."""
    import json

    import numpy as np

    fields = set()
    for path in logs:
        if not (isinstance(path, str) and path.endswith(".npz")):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if "params_json" not in data.files:
                    return None
                fields.add(json.loads(str(data["params_json"]))["field"]["name"])
        except Exception:                           # noqa: BLE001 - as_trajectory reports it
            return None
    return fields.pop() if len(fields) == 1 else None


def _tail_indices(est, args, lr_run) -> dict:
    """Both tail indices of A(t): the paper's (time in SGD iterations) and the log-log slope."""
    out = {}
    try:
        out["loglog_slope"] = est.tail_index(tail=args.tail, kind="integral")
    except ValueError as exc:
        out["loglog_slope"] = str(exc)
    if lr_run:
        try:
            out["paper"] = est.tail_index(tail=args.tail_iterations, kind="paper",
                                          time_scale=1.0 / lr_run, time_offset=1.0)
        except ValueError as exc:
            out["paper"] = str(exc)
    else:
        out["paper"] = "needs the run's learning rate (--lr) to count SGD iterations"
    return out


def _print_headline(est, level):
    """alpha, beta with bands at the knots (or the logged times of a constant fit)."""
    import numpy as np

    ts = est.ts_
    if est.form_.time == "piecewise_linear":
        idx = np.unique(np.clip(np.searchsorted(ts, est.form_.knots - 1e-12), 0, len(ts) - 1))
    elif est.form_.time == "constant":
        idx = np.array([0])
    else:
        idx = np.unique(np.linspace(0, len(ts) - 1, 6).astype(int))
    band = est.bands_
    method = est.band_method_
    print(f"ShootingEstimator ({est.form_.matrix}, {est.form_.time}, noise {est.noise_kind_}"
          + (f", SGD lr {est.lr_:.3g}" if est.lr_ > 0 else "")
          + (f", median sigma {np.median(est.sigma_):.3g}" if np.any(est.sigma_ > 0) else "")
          + f"); {level:.0%} bands: {method}")
    if not est.row_shift_identified_:
        print("  warning: alpha + (K-1) beta is not identified from this log (bands are wide); "
              "the gap alpha - beta is:")
    elif getattr(est, "stiff_bound_active_", False):
        print(f"  warning: the fit presses against the stiffness bound (max_stiffness "
              f"{est.max_stiffness:g}): E's size in its fastest direction is a lower bound, not "
              f"identified (bands are wide); the gap alpha - beta is below")
    elif not est.identified_:
        print(f"  warning: not identified (condition {est.condition_:.1e}); bands are wide")
    print(f"  {'t':>9s}  {'alpha':>10s} {'[band]':>23s}  {'beta':>10s} {'[band]':>23s}")
    for i in idx:
        a = f"[{band['alpha'][0, i]:.4g}, {band['alpha'][1, i]:.4g}]" if "alpha" in band else ""
        b = f"[{band['beta'][0, i]:.4g}, {band['beta'][1, i]:.4g}]" if "beta" in band else ""
        print(f"  {ts[i]:9.4g}  {est.alpha_[i]:10.4g} {a:>23s}  {est.beta_[i]:10.4g} {b:>23s}")
    if not est.identified_ and "gap" in band:
        print(f"  {'t':>9s}  {'gap':>10s} {'[band]':>23s}")
        for i in idx:
            g = f"[{band['gap'][0, i]:.4g}, {band['gap'][1, i]:.4g}]"
            print(f"  {ts[i]:9.4g}  {est.gap_[i]:10.4g} {g:>23s}")
    print(f"  A(T) = {est.A_[-1]:.4g}, B(T) = {est.B_[-1]:.4g}")


# --------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``lesde`` parser. Building it imports nothing heavy (no torch, numpy or matplotlib):
    ``lesde --help`` and every subcommand's ``--help`` return at once."""
    parser = _Parser(
        prog="lesde",
        description="Locally elastic stochastic differential equations: simulate, sweep, "
        "train and track real networks, fit, and draw the figures.",
        epilog="`lesde COMMAND --help` describes each command and its options with their defaults.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _name, add in _SUBCOMMANDS:
        add(sub)
    _propagate_options(parser)
    return parser


def _user_errors() -> tuple:
    """Exception classes reported as one line (exit status 2). Classes of modules that are not
    loaded cannot have been raised, so their modules are not imported for this."""
    errors = [ValueError, FileNotFoundError, OSError]
    for module, name in (("lesde.resources", "InsufficientMemoryError"),
                         ("lesde.tracking", "TrainingDivergedError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            errors.append(cls)
    return tuple(errors)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import warnings

    plain = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: (
        f"lesde {args.command}: warning: {message}\n")
    del _WROTE[:], _STOPPED[:]
    import time

    t0 = time.perf_counter()
    name = " ".join(str(v) for v in (args.command, getattr(args, "figure", None),
                                      getattr(args, "job", None)) if v)
    try:
        _threads(args)
        rc = int(args.func(args) or 0)
        if rc == 0 and not _STOPPED:
            print(f"lesde {name}: finished in {time.perf_counter() - t0:.1f} s")
        return rc
    except Exception as exc:  # user errors: one clear line
        if not isinstance(exc, _user_errors()):
            raise
        print(f"lesde {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
