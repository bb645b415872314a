"""The package's imports follow the pipeline: trace → analyze → skeleton → codegen → optim, with the
kernels below codegen and optim importing nothing of the compiler, and the command-line side on top.
Every import statement counts, also those inside functions."""
import ast
from pathlib import Path

import pytest

import invariance_compiler
from invariance_compiler import kernels

ROOT = Path(invariance_compiler.__file__).parent
KERNELS = Path(kernels.__file__).parent          # beside the package, installed inside it
# a module may import its own layer and those below it
# (the package's __init__, the public names, sits above the pipeline and below the command line)
LAYER = {"kernels": 0, "trace": 1, "analyze": 2, "skeleton": 3, "codegen": 4, "optim": 5, "equalize": 5, "rotate": 5,
         "__init__": 6, "tools": 7, "__main__": 8}


def _unit(parts: tuple) -> str:
    """The layer a module belongs to: its first path component under the package (a name that is
    no module of the package comes from its __init__)."""
    return parts[0] if parts and parts[0] in LAYER else "__init__"


def _modules():
    for root, prefix in ((ROOT, ()), (KERNELS, ("kernels",))):
        for path in sorted(root.rglob("*.py")):
            rel = prefix + path.relative_to(root).with_suffix("").parts
            yield rel, rel[:-1], ast.parse(path.read_text(), str(path))      # (its package)


def _imported(package: tuple, tree, private: list | None = None) -> set:
    """The package units a module imports (relative and absolute); names starting with '_' that it
    takes from another unit go to `private`."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = base + tuple(node.module.split(".")) if node.module else base
                names = [target + (a.name,) for a in node.names] if not node.module else [target]
            elif node.module and node.module.split(".")[0] == "invariance_compiler":
                names = [tuple(node.module.split(".")[1:])]
            else:
                continue
            for t in names:
                out.add(_unit(t))
            if private is not None and _unit(names[0]) != _unit(package):
                private += [f"{a.name} from {'.'.join(names[0])}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "invariance_compiler":
                    out.add(_unit(tuple(a.name.split(".")[1:])))
    return out


def test_no_import_runs_back_up_the_pipeline():
    seen, bad = 0, []
    for rel, package, tree in _modules():
        private = []
        here = rel[0]                                   # its first path component
        assert here in LAYER, f"{'/'.join(rel)}: a module of no known layer; add it to LAYER"
        units = _imported(package, tree, private)
        bad += [f"{'/'.join(rel)} reads the private {p}" for p in private]
        for unit in units:
            seen += 1
            if unit not in LAYER:
                bad.append(f"{'/'.join(rel)} imports unknown '{unit}'")
            elif LAYER[unit] > LAYER[here] or (here == "kernels" and unit != "kernels"):
                bad.append(f"{'/'.join(rel)} ({here}) imports {unit}")
    assert seen > 20                   # the walk found the imports
    assert not bad, "\n".join(bad)


def test_the_walk_sees_a_violation():
    tree = ast.parse("from ..optim import GSGD\nfrom . import layout\n")
    private = []
    assert _imported(("kernels",), tree, private) == {"optim", "kernels"} and not private
    tree = ast.parse("from ..codegen.module import _check, ok\n")
    assert _imported(("optim",), tree, private) == {"codegen"} and private == ["_check from codegen.module"]
    tree = ast.parse("def f():\n    from invariance_compiler.codegen import allocate\n")
    assert _imported(("trace",), tree) == {"codegen"}


def test_kernels_sit_beside_the_package_and_every_package_is_installed():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")
    assert KERNELS == ROOT.parent / "kernels"
    config = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(("invariance_compiler",) + p.relative_to(ROOT).parts[:-1]).rstrip(".")
             for p in ROOT.rglob("__init__.py")} | {"invariance_compiler.kernels"}
    assert set(config["packages"]) == found
    assert config["package-dir"] == {"invariance_compiler.kernels": "kernels"}


def test_the_package_imports_and_compiles_without_triton():
    """Triton is optional (macOS): the kernels are then plain functions nothing launches."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, invariance_compiler as ic\n"
            "from invariance_compiler import kernels\n"
            "from invariance_compiler.tools.zoo import ZOO\n"
            "m, x = ZOO['mlp']()\n"
            "cm = ic.compile_invariant(m, x, scale_activations=False)\n"
            "assert not kernels.triton_available() and not kernels.use_triton(torch.zeros(1))\n"
            "assert torch.allclose(cm(*x), m(*x), rtol=1e-5, atol=1e-6)\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_the_checkout_does_not_shadow_the_pypi_kernels_package():
    """Run from the checkout (its root first on sys.path), `import kernels` is the PyPI package
    transformers requires, never this folder; transformers imports."""
    import subprocess
    import sys
    pytest.importorskip("transformers")
    code = ("import kernels, transformers.activations\n"
            "from pathlib import Path\n"
            "assert Path(kernels.__file__).resolve().parent != Path('kernels').resolve(), kernels.__file__\n"
            "import invariance_compiler.kernels as ours\n"
            "assert Path(ours.__file__).resolve().parent == Path('kernels').resolve()\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT.parent)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
