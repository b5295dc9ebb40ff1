"""Building the CUDA extension ``sharpfused._C``: the build decision shared with ``setup.py``, and a JIT build.

``setup.py`` loads this file by path (it must not import the package), so the module imports
nothing heavy at the top: torch is imported inside the functions that need it.

Where the sources are: ``csrc/`` at the repository root, shipped inside the wheel as
``sharpfused/csrc`` (package data), so :func:`build_extension` works both from a source
checkout or editable install and from a wheel installed without compiling.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Optional

#: architectures compiled when TORCH_CUDA_ARCH_LIST is not set: Ampere, Ada, Hopper (+PTX for newer GPUs)
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
#: kernel and binding sources, in csrc/
SOURCES = (
    "bindings.cpp",
    "sq_norm.cu",
    "perturb.cu",
    "restore.cu",
    "dot_norms.cu",
    "combine.cu",
    "restore_step.cu",
)


def arch_list(env: Optional[Mapping[str, str]] = None) -> str:
    """TORCH_CUDA_ARCH_LIST when set (and not empty), else :data:`DEFAULT_ARCH_LIST`."""
    env = os.environ if env is None else env
    return env.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def find_nvcc(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Path of nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, then PATH; None when absent."""
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = env.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc", path=env.get("PATH"))


def torch_cuda_version() -> Optional[str]:
    """The CUDA version torch was built with (``torch.version.cuda``); None for a CPU build or no torch."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def build_decision(
    env: Optional[Mapping[str, str]] = None,
    torch_cuda: Optional[str] = "probe",
    nvcc: Optional[str] = "probe",
) -> tuple[bool, str]:
    """Whether ``setup.py`` builds the extension, and why.

    SHARPFUSED_SKIP_CUDA=1 never builds. Otherwise it builds when torch has CUDA and nvcc is
    found. SHARPFUSED_FORCE_CUDA=1 builds without looking for a GPU (wheels on a build machine)
    and turns a missing toolchain into an error instead of a pure-Python package.
    ``torch_cuda``/``nvcc`` default to probing this machine; tests pass them explicitly.
    """
    env = os.environ if env is None else env
    if env.get("SHARPFUSED_SKIP_CUDA") == "1":
        return False, "SHARPFUSED_SKIP_CUDA=1"
    if torch_cuda == "probe":
        torch_cuda = torch_cuda_version()
    if nvcc == "probe":
        nvcc = find_nvcc(env)
    missing = []
    if not torch_cuda:
        missing.append("the installed torch has no CUDA (a CPU build, or torch is not importable)")
    if not nvcc:
        missing.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if env.get("SHARPFUSED_FORCE_CUDA") == "1":
        if missing:
            raise RuntimeError("SHARPFUSED_FORCE_CUDA=1 but " + "; ".join(missing))
        return True, "SHARPFUSED_FORCE_CUDA=1"
    if missing:
        return False, "; ".join(missing)
    return True, f"torch CUDA {torch_cuda}, nvcc at {nvcc}"


def torch_version() -> Optional[str]:
    """The installed torch's version (``torch.__version__``, e.g. ``2.11.0+cu130``); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def torch_cuda_tag(torch_ver: str, cuda: str) -> str:
    """The label naming a torch ABI: ``torch2.11.cu130`` for torch 2.11.x built with CUDA 13.0."""
    major_minor = ".".join(torch_ver.split("+")[0].split(".")[:2])
    return f"torch{major_minor}.cu{cuda.replace('.', '')}"


def local_version(
    env: Optional[Mapping[str, str]] = None,
    torch_ver: Optional[str] = "probe",
    torch_cuda: Optional[str] = "probe",
    with_extension: bool = True,
) -> str:
    """The PEP 440 local version label of the package being built ('' for none).

    SHARPFUSED_LOCAL_VERSION, when set, is used as given ('' or 'none': no label). Otherwise a
    build with SHARPFUSED_FORCE_CUDA=1 that compiles the extension gets the torch ABI it was
    built against (:func:`torch_cuda_tag`, e.g. ``torch2.11.cu130``: the wheel is
    ``sharpfused-0.1.0+torch2.11.cu130-...``); every other build (pure, ``pip install -e .``)
    none, so it stays 0.1.0.
    """
    env = os.environ if env is None else env
    label = env.get("SHARPFUSED_LOCAL_VERSION")
    if label is None:
        if not (with_extension and env.get("SHARPFUSED_FORCE_CUDA") == "1"):
            return ""
        torch_ver = torch_version() if torch_ver == "probe" else torch_ver
        torch_cuda = torch_cuda_version() if torch_cuda == "probe" else torch_cuda
        if not torch_ver or not torch_cuda:
            return ""
        label = torch_cuda_tag(torch_ver, torch_cuda)
    label = label.strip()
    if label.lower() in ("", "none"):
        return ""
    if not re.fullmatch(r"[A-Za-z0-9]+([.][A-Za-z0-9]+)*", label):
        raise ValueError(
            f"SHARPFUSED_LOCAL_VERSION={label!r} is not a PEP 440 local version label (letters, digits, dots)"
        )
    return label


def torch_requirement(torch_ver: str) -> str:
    """The requirement of a wheel holding the extension: the torch minor it was compiled against."""
    return "torch==" + ".".join(torch_ver.split("+")[0].split(".")[:2]) + ".*"


def default_max_jobs() -> int:
    """Parallel compile jobs: the CPU count, bounded by available memory (about 4 GiB per nvcc job)."""
    cpus = os.cpu_count() or 1
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):  # not Linux: no bound from memory
        return cpus
    return max(1, min(cpus, int(free_gib // 4)))


def csrc_dir() -> Path:
    """The extension's sources: sharpfused/csrc in an installed wheel, else csrc/ of the checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "bindings.cpp").is_file():
            return cand
    raise RuntimeError(
        f"cannot build sharpfused._C: its sources were found neither in {here / 'csrc'} (installed wheel) "
        f"nor in {here.parent / 'csrc'} (source checkout)"
    )


def build_extension(verbose: bool = False) -> ModuleType:
    """Compile ``sharpfused._C`` now (torch.utils.cpp_extension.load with ninja) and enable backend="cuda".

    For an install made without the extension (e.g. SHARPFUSED_SKIP_CUDA=1, or no nvcc at
    install time). The build is cached by torch (``TORCH_EXTENSIONS_DIR``, default
    ``~/.cache/torch_extensions``): later calls in new processes only load it. Call it before
    the first use of the cuda backend in each process. Honours TORCH_CUDA_ARCH_LIST (else the
    visible GPU's architecture) and MAX_JOBS.

    Raises RuntimeError naming what is missing when torch has no CUDA or nvcc is absent.
    """
    cuda = torch_cuda_version()
    if not cuda:
        import torch

        raise RuntimeError(
            f"cannot build sharpfused._C: this torch ({torch.__version__}) is built without CUDA; "
            "install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
        )
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or find_nvcc() is None:
        raise RuntimeError(
            "cannot build sharpfused._C: nvcc (the CUDA toolkit) was not found; install the CUDA toolkit "
            f"matching torch's CUDA {cuda} and set CUDA_HOME or put nvcc on PATH"
        )
    src = csrc_dir()
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    mod = cpp_extension.load(
        name="sharpfused_C",
        sources=[str(src / s) for s in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        verbose=verbose,
    )
    # make it importable as sharpfused._C and let the ops layer try the cuda backend again
    sys.modules["sharpfused._C"] = mod
    pkg = sys.modules.get("sharpfused")
    if pkg is not None:
        pkg._C = mod  # type: ignore[attr-defined]
    ops = sys.modules.get("sharpfused.ops")
    if ops is not None:
        ops._why_not.pop("cuda", None)
    return mod
