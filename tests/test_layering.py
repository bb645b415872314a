"""The package's imports follow the pipeline: trace → analyze → skeleton → codegen → optim, with the
kernels below codegen and optim importing nothing of the compiler, and the command-line side on top.
Every import statement counts, also those inside functions."""
import ast
from pathlib import Path

import invariance_compiler

ROOT = Path(invariance_compiler.__file__).parent
# a module may import its own layer and those below it
# (the package's __init__, the public names, sits above the pipeline and below the command line)
LAYER = {"kernels": 0, "trace": 1, "analyze": 2, "skeleton": 3, "codegen": 4, "optim": 5, "equalize": 5,
         "__init__": 6, "zoo": 7, "demo": 8, "profile": 8, "__main__": 9}


def _unit(parts: tuple) -> str:
    """The layer a module belongs to: its first path component under the package (a name that is
    no module of the package comes from its __init__)."""
    return parts[0] if parts and parts[0] in LAYER else "__init__"


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        if ".venv" in rel:
            continue
        package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
        yield rel, package, ast.parse(path.read_text(), str(path))


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
        here = _unit(rel if rel[-1] != "__init__" else rel[:-1]) if len(rel) > 1 else rel[0]
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
