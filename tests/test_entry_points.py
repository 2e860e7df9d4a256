"""Entry points: the console scripts of pyproject.toml and the scripts in jobs/, which call the same mains.

jobs/*.py are thin: no sys.path manipulation (the packages are installed, or on PYTHONPATH), one import of a
main that is also a console script. Every script's --help runs and prints its own usage text.
"""

import ast
import inspect
import json
import os
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.py"))


# Console scripts with no script in jobs/: `vlm-batch COMMAND` dispatches to the jobs' mains.
UMBRELLA = {"vlm-batch": "pipeline.cli:main"}


def console_scripts() -> dict[str, str]:
    """The console scripts that mirror a script in jobs/."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {k: scripts.get(k) for k in UMBRELLA} == UMBRELLA
    return {k: v for k, v in scripts.items() if k not in UMBRELLA}


def imported_main(script: Path) -> str:
    """``module:function`` of the one ``from module import function`` of a job script."""
    imports = [n for n in ast.parse(script.read_text()).body if isinstance(n, ast.ImportFrom)]
    assert len(imports) == 1 and len(imports[0].names) == 1, f"{script.name}: one `from X import main` expected"
    return f"{imports[0].module}:{imports[0].names[0].name}"


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_every_console_script_target_is_a_main_taking_argv():
    scripts = console_scripts()
    assert len(scripts) == len(JOBS)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in patterns}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module.split(".")[0] in packages, f"{name}: {module} is not in an installed package"
        main = getattr(import_module(module), function)
        assert callable(main), name
        argv = inspect.signature(main).parameters.get("argv")
        assert argv is not None and argv.default is None, f"{name}: {target} must take argv=None"


def test_job_scripts_are_thin_and_are_the_console_scripts():
    targets = set(console_scripts().values())
    mains = {}
    for script in JOBS:
        text = script.read_text()
        assert "sys.path" not in text, script.name
        assert len(text.splitlines()) < 30, f"{script.name} holds logic; it belongs in a package"
        mains[script.name] = imported_main(script)
        assert mains[script.name] in targets, f"{script.name} calls {mains[script.name]}, not a console script"
    assert set(mains.values()) == targets
    assert not (ROOT / "jobs" / "__init__.py").exists()


def test_no_package_imports_the_tests():
    for package in ("operators", "pipeline", "synthetic", "training", "evaluation", "jobs"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                assert not any(n == "tests" or n.startswith("tests.") for n in names), path


# Runs every job script's --help in one interpreter (imports shared: a few seconds, not one torch import each).
HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    buffer = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = e.code
    out[path] = [code, buffer.getvalue()]
print(json.dumps(out))
"""


def test_every_job_script_prints_its_own_help():
    scripts = [str(p.relative_to(ROOT)) for p in JOBS]
    done = subprocess.run(
        [sys.executable, "-c", HELP_ALL, *scripts],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    helps = json.loads(done.stdout.strip().splitlines()[-1])
    for script, (code, text) in helps.items():
        assert code in (0, None) and text.startswith("usage:"), f"{script}: exit {code}\n{text}"
        assert f"python {script}" in text, f"{script}: its --help does not show its own usage\n{text}"
    assert "--baseline" in helps["jobs/videoqa.py"][1] and "jobs/caption.py" not in helps["jobs/videoqa.py"][1]


def test_a_job_script_runs_as_a_plain_script():
    """``python jobs/caption.py`` as documented: sys.path[0] is jobs/, the packages come from the install/path."""
    done = subprocess.run(
        [sys.executable, "jobs/caption.py", "--help"], cwd=ROOT, env=child_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "python jobs/caption.py --config" in done.stdout
