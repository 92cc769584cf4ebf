"""Fixtures for the cross-package tests."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

TOY_PATH = Path(__file__).resolve().parent / "toy_family.py"

# The fuzz tests (test_hostile_*.py) try the same bounded set of cases on every run and machine:
# derandomized (a failure found once is found again), no example database written, no deadline (a
# loaded machine is slower, not wrong). STUNE_FUZZ_EXAMPLES raises the bound for a long local hunt.
settings.register_profile(
    "stune-fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=int(os.environ.get("STUNE_FUZZ_EXAMPLES", "200")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


def load_toy() -> ModuleType:
    """Import tests/toy_family.py from its path (pytest runs with --import-mode=importlib), once."""
    name = "stune_test_toy_family"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOY_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy DiT pipeline with random weights, saved once per test session."""
    return load_toy().build_toy_model(tmp_path_factory.mktemp("toy-model") / "model")
