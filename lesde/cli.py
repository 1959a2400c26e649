"""The ``lesde`` command line: one subcommand per main job.

Each subcommand is a pair ``_add_<name>(sub)`` (its argparse parser) and ``_run_<name>(args)``
(its work). Heavy modules are imported inside the ``_run_`` functions so that ``lesde --help``
stays fast. Nothing in the package imports this module.
"""
from __future__ import annotations

import argparse
import sys


_SUBCOMMANDS = []  # (name, add-function) in the order shown by --help


def _subcommand(add):
    """Register ``_add_<name>`` as a subcommand parser builder."""
    _SUBCOMMANDS.append((add.__name__[len("_add_"):], add))
    return add


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(int(args.threads))


# --------------------------------------------------------------------------------------------
# subcommands (engine)
# --------------------------------------------------------------------------------------------
# [engine subcommands are added here]
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
# the parser
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesde",
        description="Locally elastic stochastic differential equations: simulate, sweep, "
        "train and track real networks, fit, and draw the figures.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _name, add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _threads(args)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as exc:  # user errors: one clear line
        print(f"lesde {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
