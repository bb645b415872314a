"""The repository stands alone and its documents hold together: every "DESIGN §N" cited in the code
resolves to a heading of docs/design.md, every relative link of the README and docs/ resolves (file
and anchor), no file points outside the repository, the README stays the front door (≤ 250 lines),
and benchmarks and examples import only the package, never tests/."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked(*patterns):
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
        files = [ROOT / f for f in out.stdout.split()]
    except (OSError, subprocess.CalledProcessError):          # not a git checkout: the tree
        files = [p for pat in patterns for p in ROOT.rglob(pat) if ".venv" not in p.parts]
    return [f for f in files if f.is_file()]


def _headings(path: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_every_design_citation_resolves_to_a_heading():
    numbers = set()
    for h in _headings(ROOT / "docs" / "design.md"):
        m = re.match(r"(\d+[a-z]?(?:\.\d+[a-z]?)*)\.? ", h)
        if m:
            numbers.add(m.group(1))
    cited = {}
    for f in _tracked("*.py", "*.md", "*.cpp"):
        for n in re.findall(r"DESIGN §(\d+[a-z]?(?:\.\d+[a-z]?)*)", f.read_text(errors="ignore")):
            cited.setdefault(n, f.relative_to(ROOT))
    assert cited, "no citation found: the pattern is wrong"
    missing = {n: str(f) for n, f in cited.items() if n not in numbers}
    assert not missing, f"DESIGN sections cited but not headings of docs/design.md: {missing}"


def _links():
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", f.read_text()):
            if not re.match(r"[a-z]+:", target):
                yield f, target


def test_every_relative_link_resolves():
    links = list(_links())
    assert len(links) > 20
    bad = []
    for f, target in links:
        path, _, anchor = target.partition("#")
        dest = (f.parent / path).resolve() if path else f
        if not dest.exists():
            bad.append(f"{f.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in {_slug(h) for h in _headings(dest)}:
            bad.append(f"{f.relative_to(ROOT)}: {target} (no such heading)")
        elif ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{f.relative_to(ROOT)}: {target} (outside the repository)")
    assert not bad, bad


@pytest.mark.parametrize("pattern", [r"\.\./shared", r"shared/papers", r"/work/"])
def test_no_file_points_outside_the_repository(pattern):
    hits = [str(f.relative_to(ROOT)) for f in _tracked("*.py", "*.md", "*.toml", "*.sh", "*.cfg", ".ci/*")
            if re.search(pattern, f.read_text(errors="ignore")) and f.name != "test_docs.py"]
    assert not hits, hits


def test_readme_is_the_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    text = "\n".join(lines)
    assert "bash scripts/setup.sh && .venv/bin/python -m invariance_compiler demo" in text
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in text


def test_benchmarks_and_examples_import_only_the_package():
    bad = []
    for f in _tracked("benchmarks/*.py", "examples/*.py"):
        text = f.read_text()
        if re.search(r"^\s*(from|import) (conftest|hf_families|tests)\b", text, re.M) or '"tests")' in text:
            bad.append(str(f.relative_to(ROOT)))
    assert not bad, bad
