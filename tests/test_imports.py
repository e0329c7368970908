"""Every tether module imports; the core never imports an optional backend (ray, vllm, deepspeed, peft)."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import tether

OPTIONAL = ("ray", "vllm", "deepspeed", "peft")
# modules that need an optional extra to import at all (none of tether.backends does at module level)
NEEDS = {"tether.feedback": ("fastapi", "sqlalchemy"), "benchmarks": ("trl",)}


def _modules():
    for m in pkgutil.walk_packages(tether.__path__, "tether."):
        if ".migrations" in m.name:  # Alembic scripts run inside Alembic, not as imports
            continue
        yield m.name


def _available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_imports(name):
    for prefix, deps in NEEDS.items():
        if name.startswith(prefix) and not all(_available(d) for d in deps):
            pytest.skip(f"{name} needs {deps}")
    importlib.import_module(name)


def test_every_command_is_in_the_installed_package():
    # `tether bench` pointed at benchmarks.compare, which is not installed (ModuleNotFoundError)
    from tether.cli import COMMANDS

    for name, (target, _) in COMMANDS.items():
        module = target.split(":")[0]
        assert module.startswith("tether."), f"tether {name} runs {module}, outside the installed package"
        assert importlib.util.find_spec(module) is not None, module


def test_core_imports_no_optional_backend():
    code = (
        "import sys, importlib, pkgutil\n"
        "import tether, tether.engine, tether.models, tether.rollout, tether.checkpoint, tether.track, tether.ranks, tether.backends, tether.cli\n"
        "import tether.algo\n"
        "for m in pkgutil.iter_modules(tether.algo.__path__, 'tether.algo.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"the core imported {out.stdout.strip()}"


# Algorithms see only the two seams: a backend is picked from the tables in tether.engine / tether.rollout.
BACKEND_MODULES = ("tether.engine.local", "tether.rollout.hf", "tether.backends", "ray", "vllm", "peft", "deepspeed")


def _imports(path):
    """Every module a file imports, function-local imports included."""
    import ast

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_algorithms_name_no_backend():
    from pathlib import Path

    algo = Path(tether.__file__).parent / "algo"
    bad = sorted(
        f"{p.name} imports {m}"
        for p in algo.glob("*.py")
        for m in set(_imports(p))
        if any(m == b or m.startswith(b + ".") for b in BACKEND_MODULES)
    )
    assert not bad, "; ".join(bad)


def test_the_import_check_sees_local_imports(tmp_path):
    # the check above must see an import inside a function, or it proves nothing
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from tether.backends.lora import x\n    import ray\n")
    assert {"tether.backends.lora", "ray"} <= set(_imports(f))


def _tether_graph():
    """module -> the tether modules it imports (function-local imports included). `from pkg import name`
    counts as importing pkg.name when that is a module, else pkg."""
    from pathlib import Path

    root = Path(tether.__file__).parent
    files = {}
    for p in root.rglob("*.py"):
        if "migrations" in p.parts:
            continue
        parts = p.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for mod, p in files.items():
        deps = set()
        for m in _imports(p):
            while m and m not in files:  # 'tether.x.name' -> 'tether.x'
                m = m.rpartition(".")[0]
            if m and m != mod and m.startswith("tether"):
                deps.add(m)
        graph[mod] = deps
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            # a package's __init__ importing its own submodules is not a cycle back through the package
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle():
    c = _cycle(_tether_graph())
    assert c is None, "import cycle: " + " -> ".join(c)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
