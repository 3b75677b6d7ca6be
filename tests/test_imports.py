"""What ``import dlsn_kernels`` costs: Triton is imported only when the Triton backend is first used."""

import subprocess
import sys


def test_import_does_not_import_triton():
    code = "import sys, dlsn_kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _package_imports(root):
    """``{module: modules of the dlsn package it imports}``, TYPE_CHECKING imports included."""
    import ast
    from pathlib import Path

    graph = {}
    for path in Path(root).rglob("*.py"):
        parts = path.relative_to(Path(root).parents[1]).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[module] = {m for m in found if m.startswith("dlsn.") and m != module}
    return graph


def test_training_modules_import_each_other_without_cycles():
    from pathlib import Path

    graph = _package_imports(Path(__file__).resolve().parents[1] / "dlsn" / "training")
    training = {m for m in graph if m != "dlsn.training"}  # the package's __init__ gathers them all

    def reaches(start, goal, seen=()):
        return any(n == goal or (n in training and n not in seen and reaches(n, goal, (*seen, n)))
                   for n in graph.get(start, ()))

    cycles = sorted(m for m in training if reaches(m, m))
    assert not cycles, f"import cycles through {cycles}"
    assert "dlsn.training.trainer" not in graph["dlsn.training.report"]
