"""What ``import dlsn_kernels`` costs: Triton is imported only when the Triton backend is first used."""

import subprocess
import sys


def test_import_does_not_import_triton():
    code = "import sys, dlsn_kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_training_modules_import_each_other_without_cycles():
    from pathlib import Path

    graph = _import_graph(Path(__file__).resolve().parents[1] / "dlsn" / "training")
    training = {m for m in graph if m != "dlsn.training"}  # the package's __init__ gathers them all

    def reaches(start, goal, seen=()):
        return any(n == goal or (n in training and n not in seen and reaches(n, goal, (*seen, n)))
                   for n in graph.get(start, ()))

    cycles = sorted(m for m in training if reaches(m, m))
    assert not cycles, f"import cycles through {cycles}"
    assert "dlsn.training.trainer" not in graph["dlsn.training.report"]


def _import_graph(root):
    """``{module: modules under root it imports}`` for the package folder ``root`` (function-local and
    TYPE_CHECKING imports included), with ``from . import x`` resolved to the module ``x`` when it is one."""
    import ast

    base_dir = root
    while (base_dir.parent / "__init__.py").exists():
        base_dir = base_dir.parent
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(base_dir.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in names.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[module] = {m for m in found if m in names and m != module}
    return graph


def test_kernel_package_has_no_import_cycles():
    """Issue 26: ``_ops``, ``_checks``, ``flex`` and ``triton/`` used to import each other through 17
    function-local imports. A package ``__init__`` may gather its own submodules; nothing else may loop."""
    from pathlib import Path

    graph = _import_graph(Path(__file__).resolve().parents[1] / "dlsn_kernels")

    def path_to(start, goal, seen=()):
        for nxt in sorted(graph.get(start, ())):
            if nxt.startswith(start + ".") and start in ("dlsn_kernels", "dlsn_kernels.backends",
                                                          "dlsn_kernels.triton"):
                continue  # a package importing its own submodules is not a cycle through them
            if nxt == goal:
                return [*seen, start, nxt]
            if nxt not in seen and nxt != start:
                found = path_to(nxt, goal, (*seen, start))
                if found:
                    return found
        return None

    cycles = [path_to(m, m) for m in sorted(graph)]
    cycles = [" -> ".join(c) for c in cycles if c]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
    assert "dlsn_kernels" not in graph["dlsn_kernels._dispatch"]  # the dispatcher never reaches the public ops


def test_dispatch_is_imported_without_triton_and_without_a_file_read():
    """The automatic choice reads nothing at import: the cache is read at the first automatic call."""
    code = ("import sys, dlsn_kernels, dlsn_kernels._dispatch as d; "
            "print('triton' in sys.modules, 'cache' in d._STATE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
