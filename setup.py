"""Build sharpfused: a pure-Python package plus the optional CUDA extension ``sharpfused._C``.

Environment switches:
  SHARPFUSED_SKIP_CUDA=1   never build the extension (sdist, CPU-only CI, pure wheel)
  SHARPFUSED_FORCE_CUDA=1  build it even without a visible GPU (wheels on a build machine)
"""

import os

from setuptools import setup

PACKAGES = ["sharpfused", "sharpfused.backends", "sharpfused.optim", "sharpfused.kernels"]
PACKAGE_DIR = {"sharpfused.kernels": "kernels"}


def ext_modules_and_cmdclass():
    if os.environ.get("SHARPFUSED_SKIP_CUDA") == "1":
        return [], {}
    return [], {}  # the CUDA build lands with the CUDA backend


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
