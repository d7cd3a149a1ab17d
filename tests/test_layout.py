"""The packages depend one way: main.py → runtime → dataset → model, and every one may use common."""
import ast
import glob
import os

from tests.conftest import ROOT

# What each package may import from the project's own packages.
ALLOWED = {"common": {"common"}, "model": {"model", "common"},
           "dataset": {"dataset", "model", "common"},
           "runtime": {"runtime", "dataset", "model", "common"}}


def project_imports(path):
    """The top-level project packages a module imports (anywhere in it, also inside functions)."""
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


def test_dependencies_run_one_way():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in glob.glob(os.path.join(ROOT, package, "*.py")):
            for name in project_imports(path) - allowed:
                wrong.append(f"{os.path.relpath(path, ROOT)} imports {name}")
    assert not wrong, wrong
