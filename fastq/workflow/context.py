"""What a step's handler sees of its run: ``fastq.RunContext``, and the wrapper that makes a
user's step function an ordinary task (its first argument the run, its return value the step's
value with the context keys it set)."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import msgspec


class StepRun(msgspec.Struct, array_like=True, frozen=True):
    """The first argument of a step's message: which run, which step and element, and the
    run's context when it was enqueued."""

    run_id: str
    step: str
    index: int
    context: dict[str, Any] = {}


_convert = msgspec.convert


class RunContext:
    """A run's own data, for what is not a parent's result (Cloacina's context). Declare a
    parameter annotated ``fastq.RunContext`` (any name) in a step to get it.

    ``get`` sees the context as it was when the step was enqueued (what its ancestors set);
    ``set`` is recorded with the step's result, in the same transaction: a step that fails sets
    nothing. Steps that run in parallel and set one key: the last to end wins.
    """

    def __init__(self, run: StepRun) -> None:
        self.run_id = run.run_id
        #: the step's name, and its element (-1: it does not fan out)
        self.step, self.index = run.step, run.index
        self._values: dict[str, Any] = dict(run.context)
        self._set: dict[str, Any] = {}

    def get(self, key: str, default: Any = None, *, type: Any = None) -> Any:
        """The value of ``key`` (``default`` when unset), converted to ``type`` if given."""
        if key not in self._values:
            return default
        value = self._values[key]
        return value if type is None else _convert(value, type)

    def set(self, key: str, value: Any) -> None:
        """Set ``key`` for the steps enqueued after this one ends (msgspec Structs, builtins)."""
        msgspec.msgpack.encode(value)  # fails here, in the step, if it does not encode
        self._values[key] = self._set[key] = value

    def __repr__(self) -> str:
        return f"<RunContext run={self.run_id} step={self.step} keys={sorted(self._values)}>"


def wrap(
    fn: Callable[..., Any], params: list[tuple[str, Any]], ctx_param: str | None, returns: Any
) -> Callable[..., Any]:
    """A task function for step ``fn``: ``(run: StepRun, *params) -> (value, context set,
    started_at)``, typed so that the worker validates the arguments and the return value."""

    def call(run: StepRun, args: tuple[Any, ...]) -> tuple[RunContext, dict[str, Any]]:
        ctx = RunContext(run)
        kwargs = {name: a for (name, _), a in zip(params, args, strict=True)}
        if ctx_param is not None:
            kwargs[ctx_param] = ctx
        return ctx, kwargs

    if inspect.iscoroutinefunction(fn):

        async def step_async(run: StepRun, *args: Any) -> Any:
            started = time.time()
            ctx, kwargs = call(run, args)
            value = await fn(**kwargs)
            return value, ctx._set, started

        wrapper: Callable[..., Any] = step_async
    else:

        def step_sync(run: StepRun, *args: Any) -> Any:
            started = time.time()
            ctx, kwargs = call(run, args)
            return fn(**kwargs), ctx._set, started

        wrapper = step_sync
    functools.update_wrapper(wrapper, fn, assigned=("__module__", "__name__", "__qualname__"))
    P = inspect.Parameter
    own = inspect.signature(fn).parameters  # their defaults: what start() may leave out
    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P("run", P.POSITIONAL_OR_KEYWORD)]
        + [P(name, P.POSITIONAL_OR_KEYWORD, default=own[name].default) for name, _ in params]
    )
    wrapper.__annotations__ = {
        "run": StepRun,
        **dict(params),
        "return": tuple[returns, dict[str, Any], float],
    }
    return wrapper
