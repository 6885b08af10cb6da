"""Every jaxgpt module imports on its own in a fresh interpreter (no import circles), and library code never
imports the package root (`import jaxgpt`), whose lazy attributes would hide a circle until run time."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import jaxgpt

ROOT = Path(jaxgpt.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], "jaxgpt."))


def test_all_modules_import_in_sorted_order():
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    out = subprocess.run([sys.executable, "-c", code, *MODULES], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]


def _imports(path: Path, modules: set[str]) -> set[str]:
    """jaxgpt modules a file imports anywhere (function-level imports too: a lazy circle is still a circle),
    with the packages on their way; a package's own submodules may import it back (Python allows that)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("jaxgpt."):
            deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names}
    for dep in list(deps):
        parts = dep.split(".")
        deps |= {".".join(parts[:k]) for k in range(2, len(parts))}
    return deps


def test_no_import_circles():
    names = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in ROOT.rglob("*.py")}
    graph = {m: {d for d in _imports(p, set(names)) if not m.startswith(d + ".") and d != m}
             for m, p in names.items()}
    circles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_library_code_never_imports_the_package_root():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import) and any(a.name == "jaxgpt" for a in node.names):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} import jaxgpt")
            if isinstance(node, ast.ImportFrom) and node.module == "jaxgpt" and node.level == 0:
                # `from jaxgpt import config` names a submodule; `from jaxgpt import load` goes through the root.
                attrs = [a.name for a in node.names if not (ROOT / a.name).is_dir()
                         and not (ROOT / f"{a.name}.py").is_file()]
                if attrs:
                    offenders.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} from jaxgpt import {attrs}")
    assert not offenders, offenders
