"""Builds the three extensions, fastq._core (rings), fastq._amqp (AMQP frames off a socket) and
fastq._hooks (the record middleware sees, and the metrics' per-message counting);
everything else is in pyproject.toml.

FASTQ_DEBUG=1 builds with -O0 -g and Cython line tracing; FASTQ_ANNOTATE=1 writes the HTML
annotation next to the .pyx (where the C API calls are).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = bool(os.environ.get("FASTQ_DEBUG"))

extensions = [
    Extension(
        name,
        [f"fastq/{name.split('.')[1]}.pyx"],
        include_dirs=["fastq"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
        define_macros=[("CYTHON_TRACE_NOGIL", "1")] if DEBUG else [],
    )
    for name in ("fastq._core", "fastq._amqp", "fastq._hooks")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3, "linetrace": DEBUG},
        annotate=bool(os.environ.get("FASTQ_ANNOTATE")),
    )
)
