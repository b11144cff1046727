"""The compiled kernels of CPU sampling (nbp/generator/kernels.c: the draw's passes and the greedy head's screen) as
the optional extension nbp.generator._kernels; everything else about the package is in pyproject.toml. Without a C
compiler the build of the extension is skipped and torch ops run instead; without OpenMP it is built without it
(the screen then runs on one thread)."""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, LinkError

unix = sys.platform != "win32"
OPENMP = ["-fopenmp"] if unix else ["/openmp"]


class BuildExt(build_ext):
    """Build with OpenMP where the compiler has it, else without (nbp_threaded() says which)."""

    def build_extension(self, ext):
        plain = (list(ext.extra_compile_args), list(ext.extra_link_args))
        ext.extra_compile_args += OPENMP
        ext.extra_link_args += OPENMP if unix else []
        try:
            return super().build_extension(ext)
        except (CCompilerError, CompileError, LinkError) as e:
            self.warn(f"building {ext.name} with OpenMP failed ({e}); building it without")
        ext.extra_compile_args, ext.extra_link_args = plain
        return super().build_extension(ext)


setup(cmdclass={"build_ext": BuildExt}, ext_modules=[Extension(
    "nbp.generator._kernels", ["nbp/generator/kernels.c"], optional=True,
    # no fused multiply-add contraction and no fast-math: the draw's bits are the same on every CPU
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi"] if unix else ["/O2", "/fp:precise"])])
