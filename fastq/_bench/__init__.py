"""Scenarios of `python -m fastq bench`; bench/ wraps the same functions for pytest-benchmark."""
