"""The packages depend one way: main.py → cli → setup → tasks and loops → engines → dataset → model,
every one on common; and no top-level folder holds more than a third of the source."""
import ast
import glob
import os

from tests.conftest import ROOT

BELOW_COMMON = {"common"}
ALLOWED = {"common": BELOW_COMMON,
           "model": {"model"} | BELOW_COMMON,
           "dataset": {"dataset", "model"} | BELOW_COMMON,
           "engines": {"engines", "dataset", "model"} | BELOW_COMMON,
           "tasks": {"tasks", "engines", "dataset", "model"} | BELOW_COMMON,
           "loops": {"loops", "engines", "dataset", "model"} | BELOW_COMMON,
           "setup": {"setup", "tasks", "loops", "engines", "dataset", "model"} | BELOW_COMMON,
           "cli": {"cli", "setup", "tasks", "loops", "engines", "dataset", "model"} | BELOW_COMMON}


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


def test_no_top_level_folder_holds_more_than_a_third_of_the_source():
    lines = {}
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        parts = os.path.relpath(path, ROOT).split(os.sep)
        if parts[0] in ("tests", ".venv") or parts[0].startswith("."):
            continue
        folder = parts[0] if len(parts) > 1 else "."
        lines[folder] = lines.get(folder, 0) + sum(1 for _ in open(path))
    total = sum(lines.values())
    assert {f: n for f, n in lines.items() if n > total / 3} == {}, lines
