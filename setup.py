"""Build of the optional C kernels (loradeploy/quantize/_kernels.c); everything else is in pyproject.toml.

The kernels must reproduce ggml's reference quantizers bit for bit, so they are compiled with
-ffp-contract=off (no fused multiply-add) and -fno-fast-math, placed after any user CFLAGS so they
win. A failed build is not an error: the package installs without the extension and the quantize
engine uses ggml's own routines instead.
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

if sys.platform == "win32":
    FLAGS = ["/O2", "/fp:precise"]
else:
    FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11"]


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers: install without the kernels
            self.warn(f"loradeploy: C kernels not built ({exc}); ggml's quantizers will be used")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self.warn(f"loradeploy: building {ext.name} failed ({exc}); ggml's quantizers will be used")


setup(
    ext_modules=[Extension("loradeploy.quantize._kernels", ["loradeploy/quantize/_kernels.c"],
                           depends=["loradeploy/quantize/_kernels_vec.h", "loradeploy/quantize/_kernels_scalar.h"],
                           extra_compile_args=FLAGS, optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
