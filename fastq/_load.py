"""``module:attribute`` to the object it names; shared by the cli and the worker processes."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from fastq.errors import LoadError


def load(spec: str) -> Any:
    """The object named by ``module:attribute`` (the working directory is importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LoadError(f"{spec!r} is not module:attribute, e.g. myproject.tasks:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise LoadError(
            f"cannot import {module_name!r}: {e}; run from the directory that holds it"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise LoadError(f"module {module_name!r} has no {attr!r}") from e
    return obj
