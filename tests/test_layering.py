"""The packages depend one way: main.py → runtime (flags, settings, the run) → runtime.setup →
runtime.tasks and runtime.loops → runtime.engines → dataset → model, every one on common; the
segmenter uses dataset and common alone, without TensorFlow, Keras or JAX; model/ uses Keras 3's
API alone; no folder's own files hold more than a quarter of the source; and the public functions
of the run, the loops and the engines carry type hints and docstrings."""
import ast
import glob
import os

from tests.conftest import ROOT

# Top to bottom: a module may import its own package and every package of a lower layer.
LAYERS = [{"runtime"}, {"runtime.setup"}, {"runtime.tasks", "runtime.loops"}, {"runtime.engines"},
          {"dataset"}, {"model"}, {"common"}]
PACKAGES = set().union(*LAYERS)
BACKENDS = {"tensorflow", "keras", "jax", "jaxlib", "torch", "horovod", "habana_frameworks"}
SOURCE_FOLDERS = ("runtime", "dataset", "model", "common", "bench")


def allowed(package):
    """The packages a module of `package` may import."""
    below = next(i for i, layer in enumerate(LAYERS) if package in layer)
    return {package}.union(*LAYERS[below + 1:])


def owner(module):
    """The project package a dotted module name belongs to (the deepest one), or None."""
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        if ".".join(parts[:depth]) in PACKAGES:
            return ".".join(parts[:depth])
    return None


def imports(path):
    """Every dotted module a file imports (anywhere in it, also inside functions); a relative
    import is resolved against the file's package."""
    tree = ast.parse(open(path).read(), path)
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def wrong_imports(path, may_import, forbidden=frozenset()):
    """`path`'s imports of project packages outside `may_import`, and of any of `forbidden`."""
    found = imports(path)
    wrong = {owner(name) for name in found if owner(name) and owner(name) not in may_import}
    wrong |= {name.split(".")[0] for name in found} & forbidden
    return sorted(f"{os.path.relpath(path, ROOT)} imports {name}" for name in wrong)


def modules():
    """(path, package of the layers) of every module in the layered packages, at every depth:
    runtime/loops/hooks.py is runtime.loops's, dataset/phantom/brats.py is dataset's."""
    for package in ("runtime", "dataset", "model", "common"):
        for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True):
            dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            yield path, owner(dotted)


def test_dependencies_run_one_way():
    checked = list(modules())
    wrong = [line for path, package in checked for line in wrong_imports(path, allowed(package))]
    assert len(checked) > 50 and not wrong, wrong


def test_model_uses_keras_alone():
    wrong = []
    for path in glob.glob(os.path.join(ROOT, "model", "*.py")):
        wrong += wrong_imports(path, {"model", "common"}, BACKENDS - {"keras"})
    assert not wrong, wrong


def test_the_segmenter_needs_no_framework_and_nothing_of_the_run():
    assert wrong_imports(os.path.join(ROOT, "segment.py"), {"dataset", "common"}, BACKENDS) == []
    # ... and neither do the project modules it imports, all the way down.
    seen, todo = set(), [os.path.join(ROOT, "segment.py")]
    while todo:
        path = todo.pop()
        for name in imports(path):
            module = os.path.join(ROOT, *name.split(".")) + ".py"
            if owner(name) and os.path.exists(module) and module not in seen:
                seen.add(module)
                todo.append(module)
    wrong = [line for path in sorted(seen) for line in wrong_imports(path, {"dataset", "common"},
                                                                     BACKENDS)]
    assert seen and not wrong, wrong


def test_main_enters_through_the_run():
    may = {"runtime", "runtime.setup", "runtime.loops", "common"}
    assert wrong_imports(os.path.join(ROOT, "main.py"), may) == []


def test_the_wrong_import_is_caught(tmp_path):
    """The checks above can fail: a dataset module importing the loops, or the segmenter
    importing TensorFlow, is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from runtime.loops.hooks import Hooks\n    import tensorflow\n")
    assert wrong_imports(str(bad), allowed("dataset"), BACKENDS) == [
        f"{os.path.relpath(bad, ROOT)} imports runtime.loops",
        f"{os.path.relpath(bad, ROOT)} imports tensorflow"]


def test_no_folder_holds_more_than_a_quarter_of_the_source():
    lines = {}
    for top in SOURCE_FOLDERS + (".",):
        pattern = os.path.join(ROOT, top, "**", "*.py") if top != "." else os.path.join(ROOT, "*.py")
        for path in glob.glob(pattern, recursive=True):
            folder = os.path.relpath(os.path.dirname(path), ROOT)
            lines[folder] = lines.get(folder, 0) + sum(1 for _ in open(path))
    total = sum(lines.values())
    assert {f: n for f, n in lines.items() if n > total / 4} == {}, lines


def unannotated(path):
    """'path:line name: what is missing' for every public function or method of `path` (not one
    nested in a function) without a docstring, or without annotations on every parameter (the
    `self` or `cls` of a method excepted) and on its return."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                  and not child.name.startswith("_")):
                args = child.args
                params = args.posonlyargs + args.args + args.kwonlyargs + [
                    a for a in (args.vararg, args.kwarg) if a is not None]
                static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in child.decorator_list)
                if prefix and not static and params and params[0].arg in ("self", "cls"):
                    params = params[1:]
                missing = [] if ast.get_docstring(child) else ["docstring"]
                missing += [f"hint of {p.arg}" for p in params if p.annotation is None]
                missing += ["return hint"] if child.returns is None else []
                if missing:
                    found.append(f"{os.path.relpath(path, ROOT)}:{child.lineno} {prefix}{child.name}: "
                                 f"missing {', '.join(missing)}")

    visit(ast.parse(open(path).read(), path), "")
    return found


def test_public_functions_of_the_run_carry_hints_and_docstrings():
    """Every public function and method of the run, the loops and the engines says what it takes
    and returns. (The Engine protocol's methods, a docstring for a body, pass as they are.)"""
    paths = [path for folder in ("runtime", "runtime/loops", "runtime/engines")
             for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.py")))]
    wrong = [line for path in paths for line in unannotated(path)]
    assert len(paths) > 20 and not wrong, wrong


def test_a_missing_hint_is_caught(tmp_path):
    """The check above can fail: a bare parameter, a missing return hint and a missing docstring are
    reported; `self`, private and nested functions are not."""
    code = tmp_path / "code.py"
    code.write_text('class A:\n    def f(self, x: int):\n        """F."""\n        def inner(y): pass\n\n'
                    'def g(y) -> None:\n    pass\n\ndef _h(z): pass\n')
    name = os.path.relpath(code, ROOT)
    assert unannotated(str(code)) == [f"{name}:2 A.f: missing return hint",
                                      f"{name}:6 g: missing docstring, hint of y"]
