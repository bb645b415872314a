"""Lines of the package at git revisions: all lines, and code lines (no blank, comment or docstring
line), per part (a file moved between invariance_compiler/kernels/ and kernels/ counts as kernels).

    python benchmarks/package_lines.py [REV ...]        (default: HEAD)"""
from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize

PARTS = {"codegen": ("invariance_compiler/codegen",), "optim": ("invariance_compiler/optim",),
         "kernels + profile": ("kernels", "invariance_compiler/kernels", "invariance_compiler/profile.py",
                               "invariance_compiler/tools/profile.py"),
         "whole package": ("invariance_compiler", "kernels")}


def code_lines(text: str, python: bool) -> int:
    if not python:                                   # C++: non-blank lines that are not // comments
        return sum(1 for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("//"))
    docs = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(getattr(body[0].value, "value", None), str):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    return len({ln for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type not in skip
                for ln in range(tok.start[0], tok.end[0] + 1)} - docs)


def count(rev: str, paths) -> tuple[int, int]:
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout
    files = [f for f in git("ls-tree", "-r", "--name-only", rev, "--", *paths).split() if f.endswith((".py", ".cpp"))]
    texts = [(f, git("show", f"{rev}:{f}")) for f in files]
    return sum(len(t.splitlines()) for _, t in texts), sum(code_lines(t, f.endswith(".py")) for f, t in texts)


if __name__ == "__main__":
    print("| revision | " + " | ".join(f"{p}: lines / code" for p in PARTS) + " |")
    print("|---" * (len(PARTS) + 1) + "|")
    for rev in sys.argv[1:] or ["HEAD"]:
        print(f"| {rev} | " + " | ".join("%d / %d" % count(rev, paths) for paths in PARTS.values()) + " |")
