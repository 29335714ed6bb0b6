"""compile_kwargs hands torch.compile the chosen backend (mutation CO5: the backend dropped from the kwargs
survived: `--compile-backend aot_eager` silently compiled with inductor)."""
import pytest

from fastft.apps.compiling import compile_kwargs


@pytest.mark.parametrize("backend", ["inductor", "aot_eager", "eager"])
def test_default_mode_passes_the_backend_alone(backend):
    assert compile_kwargs("default", backend) == {"backend": backend}


def test_other_modes_pass_backend_and_mode():
    assert compile_kwargs("reduce-overhead", "inductor") == {"backend": "inductor", "mode": "reduce-overhead"}
