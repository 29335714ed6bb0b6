"""Which code and machine produced a result: the commit of the checkout fastft runs from (and whether its code was
edited since; a digest of its files where fastft is installed without git), the installed packages' versions and
the device's name. The study and `fastft bench` record them, and a resumed run refuses (bench) or reruns (study)
what other code, packages or hardware measured: fastft's version string does not change between commits, and the
commit not with uncommitted edits."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

CODE = ("fastft", "csrc", "benchmarks")  # what decides a measurement (tests and docs do not)
# environment variables that decide which kernels run, how they are tuned or what they check
KERNEL_ENV = ("FASTFT_LORA_BACKEND", "FASTFT_LORA_PATH", "FASTFT_LORA_OVERLAP", "FASTFT_QLORA_PATH",
              "FASTFT_QLORA_PREFETCH", "FASTFT_LOSS_CHUNK_MIB", "FASTFT_AUTOTUNE", "FASTFT_DETERMINISTIC",
              "FASTFT_DEBUG", "FASTFT_DIRECT_LAUNCH", "TRITON_INTERPRET")


def kernel_environment() -> dict[str, str]:
    """The KERNEL_ENV variables that are set, with their values: a result measured under FASTFT_LORA_BACKEND=triton
    is not one of the default backend's."""
    import os

    return {name: os.environ[name] for name in KERNEL_ENV if name in os.environ}


@functools.cache
def git_commit() -> str:
    """code_state of the checkout fastft runs from; for an installed package (no .git: `pip install fastft`), or
    without git, "installed.<digest>" of the package's files, as fastft's version string is the same for every
    commit (a result another fastft measured was read back as this one's)."""
    package = Path(__file__).resolve().parents[1]
    return code_state(package.parent) or package_digest(package)


def package_digest(package: Path) -> str:
    """"installed.<sha256>" of every file under `package` (names and contents; compiled caches left out)."""
    digest = hashlib.sha256()
    files = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and p.suffix not in (".pyc", ".pyo"))
    for path in files:
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            pass
    return f"installed.{digest.hexdigest()[:16]}"


def code_state(root: Path) -> str | None:
    """HEAD of the git checkout at root, with "+dirty.<digest>" when CODE differs from it (tracked files edited, or
    new files: the digest of those differences, so two different edits of one commit differ); None without git."""
    if not (root / ".git").exists():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return None
    diff = _git(root, "diff", "HEAD", "--binary", "--", *CODE, strip=False)
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "--", *CODE)
    if diff is None or untracked is None:
        return None
    if not diff and not untracked:
        return commit
    digest = hashlib.sha256(diff.encode())
    for name in sorted(untracked.splitlines()):
        digest.update(name.encode() + b"\0")
        try:
            digest.update((root / name).read_bytes())
        except OSError:
            pass
    return f"{commit}+dirty.{digest.hexdigest()[:12]}"


def _git(root: Path, *args: str, strip: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() if strip else out.stdout


def library_versions(names) -> dict[str, str | None]:
    """The Python version, fastft's and each distribution's in `names` (None where one is not installed); torch's
    as imported, whatever its metadata says, and the CUDA it was built with."""
    import torch

    out = {"python": platform.python_version()}
    for name in ("fastft", *names):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    return out


def device_name(device) -> str:
    """The accelerator's name, or the CPU's model ("cpu (Intel(R) Xeon(R) ...)"): results measured on different
    hardware are not comparable."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"cpu ({model})" if model else "cpu"
