"""fastft.kernels.launch's direct launch path (repeat launches skip triton's argument binding and specialization).

On the CPU: tests/direct_launch_check.py under both tritons (the venv's, the GPU machine's), with triton's binder,
specialization and cache keys running for real on a faked driver: a direct launch runs the kernel triton's run would
have picked and hands the launcher exactly the arguments triton's run hands it, for fuzzed arguments of every kind
and for each fastft launcher. On a GPU (`-m gpu`, in gpu_check.sh's kernel-tests): the fused ops give the same bits
with the direct path on and off, and the repeat calls took it."""
import pytest
import torch

from tests.sm90_runner import ROOT, TRITONS, start_compiled

pytest.importorskip("triton")


@pytest.mark.parametrize("triton_path", TRITONS)
def test_direct_launches_match_tritons_own(triton_path):
    started = start_compiled("tests.direct_launch_check", triton_path=triton_path)
    if isinstance(started, str):
        pytest.fail(started)
    stdout, stderr = started.communicate(timeout=600)
    assert started.returncode == 0, stdout[-4000:] + stderr[-4000:]
    lines = stdout.splitlines()
    assert not any(line.startswith("FAILED") for line in lines), stdout
    # the fuzzed classes, then each launcher: every one of them launched and went direct on its repeat calls
    assert sum(line.startswith("ok ") for line in lines) >= 15, stdout


def test_every_launched_kernel_takes_the_direct_path():
    """Each `_<name>_kernel` in fastft/kernels is decorated @jit (fastft.kernels.launch), so no new kernel is left on
    triton's slower launch path by a copied `@triton.jit`."""
    import pathlib
    import re

    plain = []
    for path in sorted(pathlib.Path(ROOT, "fastft", "kernels").glob("*.py")):
        for decorator, name in re.findall(r"^(@[\w.]+)\s*\ndef (_\w+_kernel)\(", path.read_text(), flags=re.M):
            if decorator != "@jit":
                plain.append(f"{path.name}: {decorator} {name}")
    assert not plain, plain


@pytest.mark.gpu
def test_direct_path_gives_the_same_bits_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fastft.kernels import launch
    from fastft.ops import lora_linear

    torch.manual_seed(0)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    A = (torch.randn(16, 512, device="cuda") * 0.05).requires_grad_()
    B = (torch.randn(384, 16, device="cuda") * 0.05).requires_grad_()
    dy = torch.randn(300, 384, device="cuda", dtype=torch.bfloat16)

    def step():
        for t in (x, A, B):
            t.grad = None
        y = lora_linear(x, W, None, A, B, 2.0)
        y.backward(dy)
        return [t.clone() for t in (y, x.grad, A.grad, B.grad)]

    from triton.runtime import jit

    tritons_run, slow_calls = jit.JITFunction.run, []

    def counting_run(self, *args, **kwargs):
        slow_calls.append(self.fn.__name__)
        return tritons_run(self, *args, **kwargs)

    saved = launch.DIRECT
    try:
        launch.DIRECT = False
        reference = step()
        launch.DIRECT = True
        step()  # the first launch of each class goes through triton's run
        jit.JITFunction.run = counting_run
        direct = step()
    finally:
        launch.DIRECT = saved
        jit.JITFunction.run = tritons_run
    assert not slow_calls, f"repeat launches that went through triton's run: {slow_calls}"
    for name, a, b in zip(("y", "dx", "dA", "dB"), reference, direct):
        assert torch.equal(a, b), f"{name} differs between triton's run and the direct path"
