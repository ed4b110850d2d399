"""Builds the one extension, fastq._core; everything else is in pyproject.toml.

FASTQ_DEBUG=1 builds with -O0 -g and Cython line tracing; FASTQ_ANNOTATE=1 writes the HTML
annotation next to the .pyx (where the C API calls are).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = bool(os.environ.get("FASTQ_DEBUG"))

extension = Extension(
    "fastq._core",
    ["fastq/_core.pyx"],
    include_dirs=["fastq"],
    extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    define_macros=[("CYTHON_TRACE_NOGIL", "1")] if DEBUG else [],
)

setup(
    ext_modules=cythonize(
        [extension],
        compiler_directives={"language_level": 3, "linetrace": DEBUG},
        annotate=bool(os.environ.get("FASTQ_ANNOTATE")),
    )
)
