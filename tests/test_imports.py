"""Every tether module imports; the core never imports an optional backend (ray, vllm, deepspeed, peft)."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import tether

OPTIONAL = ("ray", "vllm", "deepspeed", "peft")
# modules that need an optional extra to import at all (none of tether.dist does at module level)
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


def test_core_imports_no_optional_backend():
    code = (
        "import sys, importlib, pkgutil\n"
        "import tether, tether.engine, tether.models, tether.rollout, tether.checkpoint, tether.track, tether.dist, tether.cli\n"
        "import tether.algo\n"
        "for m in pkgutil.iter_modules(tether.algo.__path__, 'tether.algo.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"the core imported {out.stdout.strip()}"
