"""Start-up: `lesde --help` imports no torch (nor anything heavy), `import lesde` imports no
submodule, a simulation imports only the model and solvers, and every public name still loads."""
import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchsde", "numpy", "scipy", "pandas", "matplotlib", "seaborn", "zarr", "dask",
         "distributed", "sklearn", "pyarrow", "tqdm")


def _run(code: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_help_of_every_command_imports_nothing_heavy():
    code = f"""
import contextlib, io, json, sys
from lesde.cli import build_parser, main, _subparsers_of

def commands(parser, prefix):
    yield prefix
    sub = _subparsers_of(parser)
    if sub is not None:
        for name, child in sub.choices.items():
            yield from commands(child, prefix + [name])

argvs = list(commands(build_parser(), []))
for argv in argvs:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv + ["--help"])
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    assert "usage: lesde" in out.getvalue(), argv
print(json.dumps([len(argvs), [m for m in {HEAVY!r} if m in sys.modules]]))
"""
    n, heavy = json.loads(_run(code))
    assert n >= 15  # lesde, its commands, the figures and the elasticity jobs
    assert heavy == []


def test_lesde_script_help(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "lesde")
    if not os.path.exists(script):
        pytest.skip("the lesde console script is not installed beside this interpreter")
    res = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage: lesde" in res.stdout and "figures" in res.stdout


def test_import_lesde_loads_no_submodule_and_a_simulation_only_what_it_needs():
    code = f"""
import json, sys
import lesde
after_import = sorted(m for m in sys.modules if m.startswith("lesde."))
heavy_import = [m for m in {HEAVY!r} if m in sys.modules]
lesde.simulate, lesde.LESDE, lesde.Impacts, lesde.initial_state, lesde.Solution
after_sim = sorted(m for m in sys.modules if m.startswith("lesde."))
heavy_sim = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps([after_import, heavy_import, after_sim, heavy_sim]))
"""
    after_import, heavy_import, after_sim, heavy_sim = json.loads(_run(code))
    assert after_import == [] and heavy_import == []
    assert set(after_sim) <= {"lesde.model", "lesde.solvers", "lesde.resources"}
    assert "torch" in heavy_sim
    assert not set(heavy_sim) & {"pandas", "matplotlib", "zarr", "dask", "distributed", "sklearn",
                                 "scipy", "pyarrow"}


def test_every_public_name_loads_and_is_the_module_object():
    import importlib

    import lesde

    for name in lesde.__all__:
        value = getattr(lesde, name)
        module = lesde._ORIGIN.get(name)
        if module is None:  # a submodule exported by name
            assert value is importlib.import_module(f"lesde.{name}")
        else:
            assert value is getattr(importlib.import_module(f"lesde.{module}"), name), name
    assert set(lesde.__all__) <= set(dir(lesde))
    assert {"figures", "phase", "fit", "plotting", "cli"} <= set(dir(lesde))
    assert len(set(lesde.__all__)) == len(lesde.__all__)
    assert set(lesde._ORIGIN) | {"theory", "metrics"} == set(lesde.__all__)
    namespace = {}
    exec("from lesde import *", namespace)
    assert set(lesde.__all__) <= set(namespace)
    assert lesde.figures.plot_phase is importlib.import_module("lesde.figures").plot_phase
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lesde.not_a_name
