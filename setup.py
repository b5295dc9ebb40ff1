"""Build sharpfused: a pure-Python package plus the optional CUDA extension ``sharpfused._C``.

Environment switches:
  SHARPFUSED_SKIP_CUDA=1   never build the extension (sdist, CPU-only CI, pure wheel)
  SHARPFUSED_FORCE_CUDA=1  build it even without a visible GPU (wheels on a build machine);
                           a missing nvcc or a CPU-only torch is then an error
  TORCH_CUDA_ARCH_LIST     architectures to compile (default "8.0;8.6;8.9;9.0+PTX")
  MAX_JOBS                 parallel compile jobs (default: CPUs, bounded by free memory / 4 GiB)
  SHARPFUSED_LOCAL_VERSION local version label ("torch2.11.cu130" -> 0.1.0+torch2.11.cu130; "" or
                           "none": no label). Unset: a FORCE_CUDA build that compiles the extension
                           is labelled with the torch/CUDA it was built against, other builds get none

A wheel holding the extension (FORCE_CUDA, or a label set) also requires the torch minor it was
compiled against (``torch==2.11.*`` in place of pyproject's ``torch>=...`` floor), so it cannot install
silently beside another torch ABI. pyproject.toml keeps version and dependencies static; the
label and the pin are applied to the metadata after pyproject.toml is read (``_Distribution``).

Without SKIP, the extension is built when torch has CUDA and nvcc is found; the build needs
torch importable, so use ``pip install --no-build-isolation .``. The decision lives in
sharpfused/_build.py (shared with the run-time ``sharpfused.build_extension()``).
"""

import importlib.util
import os

from setuptools import setup
from setuptools.dist import Distribution

PACKAGES = ["sharpfused", "sharpfused.backends", "sharpfused.optim", "sharpfused.integrations", "sharpfused.kernels"]
PACKAGE_DIR = {"sharpfused.kernels": "kernels"}
# csrc/ ships inside the package as data, for the JIT build of an install made without nvcc
CSRC = {"sharpfused.csrc": "csrc"}
CSRC_FILES = ["*.cu", "*.cuh", "*.h", "*.cpp"]

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_helpers():
    """sharpfused/_build.py, loaded by path: setup.py must not import the package."""
    spec = importlib.util.spec_from_file_location("_sharpfused_build", os.path.join(HERE, "sharpfused", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ext_modules_and_cmdclass():
    helpers = _build_helpers()
    build, reason = helpers.build_decision()
    if not build:
        print(f"sharpfused: building without the CUDA extension: {reason}")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", helpers.arch_list())
    os.environ.setdefault("MAX_JOBS", str(helpers.default_max_jobs()))
    print(
        f"sharpfused: building sharpfused._C ({reason}) for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}"
    )
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name="sharpfused._C",
        sources=[f"csrc/{s}" for s in helpers.SOURCES],
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def build_metadata(with_extension: bool) -> tuple[str, str]:
    """(local version label, torch requirement) for this build; '' where the pyproject values stand."""
    helpers = _build_helpers()
    label = helpers.local_version(with_extension=with_extension)
    pin = ""
    if with_extension and (label or os.environ.get("SHARPFUSED_FORCE_CUDA") == "1"):
        ver = helpers.torch_version()
        pin = helpers.torch_requirement(ver) if ver else ""
    return label, pin


class _Distribution(Distribution):
    """Applies the local version label and the torch pin on top of pyproject.toml's static metadata."""

    def parse_config_files(self, *args, **kwargs):
        super().parse_config_files(*args, **kwargs)
        label, pin = build_metadata(bool(ext_modules))
        if label:
            base = str(self.metadata.version).split("+")[0]
            self.metadata.version = f"{base}+{label}"
        if pin:
            reqs = [r for r in (self.install_requires or []) if not str(r).replace(" ", "").startswith("torch")]
            self.install_requires = [*reqs, pin]
            self._finalize_requires()
        if label or pin:
            print(f"sharpfused: version {self.metadata.version}, requires {', '.join(map(str, self.install_requires))}")


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    distclass=_Distribution,
    packages=PACKAGES + list(CSRC),
    package_dir={**PACKAGE_DIR, **CSRC},
    package_data={"sharpfused.csrc": CSRC_FILES},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
