"""The package as a newcomer and an installer see it: its parts as folders, no import cycle, a wheel that works."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nbdiff"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every nbdiff module `path` imports, at the top or inside a function (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from nbdiff.x import y` imports the module nbdiff.x.y when there is one, else nbdiff.x
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def test_no_import_cycle_between_modules():
    modules = _modules()
    assert not [p for p in PACKAGE.rglob("*.py")
                if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))], \
        "relative imports hide edges from this check: use absolute ones"
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [name, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_parts_are_folders_with_a_docstring_each():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    parts = sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert len(parts) >= 4, parts
    for part in parts:
        doc = ast.get_docstring(ast.parse((part / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"{part.name}/__init__.py should say what the part holds and which command uses it"


def test_documented_names_import():
    import importlib

    names = [
        "nbdiff.load", "nbdiff.generate", "nbdiff.stream", "nbdiff.api.Session", "nbdiff.method.masks.training_mask",
        "nbdiff.method.noising.noise_blocks", "nbdiff.method.losses.ar_targets",
        "nbdiff.method.curriculum.BlockCurriculum", "nbdiff.method.layout.parallel_forward",
        "nbdiff.adapt.trainer.adapt", "nbdiff.adapt.recipe.AdaptConfig", "nbdiff.eval.harness.NBDiffLM",
        "nbdiff.decode.options.DecodeOptions", "nbdiff.decode.decoder.decode", "nbdiff.convert.convert",
    ]
    for dotted in names:
        module, _, attr = dotted.rpartition(".")
        assert getattr(importlib.import_module(module), attr) is not None, dotted
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for dotted in names:
        assert dotted in readme or dotted.rpartition(".")[0] in readme, f"README does not show {dotted}"


def _build_wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the tree, so the checkout gets no build/ or egg-info."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv", "runs", "out", "tmp"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("nbdiff-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installs_and_finds_its_assets_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # torch, transformers and the rest come from the test environment; a plain path line (not a site
    # folder) keeps that environment's editable install of nbdiff out of the new one
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (site / "test-env.pth").write_text("\n".join(ours or [sysconfig.get_paths()["purelib"]]) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    nbdiff_cmd = site.parent.parent.parent / "bin" / "nbdiff"
    if not nbdiff_cmd.exists():  # pip --target puts scripts in SITE/bin
        nbdiff_cmd = site / "bin" / "nbdiff"

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=outside, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = run(str(python), "-c", "import nbdiff; print(nbdiff.__file__)")
    assert Path(where.strip()).is_relative_to(site), where
    assert "nbdiff 0.1.0" in run(str(python), str(nbdiff_cmd), "--version")
    assert "--block-sizes" in run(str(python), str(nbdiff_cmd), "bench", "--help")
    code = (
        "from nbdiff.eval.bench import suite_names, load_suites; from nbdiff.resources import distill_prompts; "
        "from nbdiff.default_model import default_asset; from safetensors import safe_open; "
        "names = suite_names(); assert {'chat', 'code'} <= set(names), names; assert load_suites(names); "
        "assert distill_prompts().is_file(); "
        "from nbdiff.cpu_kernel import HERE, SOURCES; assert all((HERE / n).is_file() for n in SOURCES); "
        "f = safe_open(str(default_asset()), 'pt'); assert list(f.keys()); print('ok', len(names))"
    )
    assert run(str(python), "-c", code).startswith("ok")
