"""The compiled passes of the CPU draw (nbp/generator/kernels.c) as the optional extension nbp.generator._kernels;
everything else about the package is in pyproject.toml. Without a C compiler the build of the extension is skipped
and the draw runs its passes with torch ops."""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
setup(ext_modules=[Extension(
    "nbp.generator._kernels", ["nbp/generator/kernels.c"], optional=True,
    # no fused multiply-add contraction and no fast-math: the kernels' bits are the same on every CPU
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi"] if unix else ["/O2", "/fp:precise"])])
