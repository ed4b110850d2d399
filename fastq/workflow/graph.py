"""``app.workflow(name)``: a typed DAG of steps, each an ordinary fastq task, checked as it is
defined. See the README's "Workflows".

    wf = app.workflow("catalog")

    @wf.step(retry_attempts=2)
    async def generate_data() -> list[Product]: ...

    @wf.step(depends_on=[generate_data])
    def partition_data(generate_data: list[Product]) -> list[list[Product]]: ...
"""

from __future__ import annotations

import inspect
import threading
import types
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, get_type_hints

from fastq.errors import ConfigError
from fastq.workflow.api import RunAPI
from fastq.workflow.context import RunContext, wrap
from fastq.workflow.state import Graph, StepSpec

if TYPE_CHECKING:
    from fastq.app import App
    from fastq.task import Task

TRIGGERS = ("all_success", "all_done")


def type_name(t: Any) -> str:
    """``list[Product]``, not ``list[shop.models.Product]``."""
    if t is type(None) or t is None:
        return "None"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is not None and args:
        if origin in (typing.Union, types.UnionType):
            return " | ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', repr(origin))}[{', '.join(map(type_name, args))}]"
    return getattr(t, "__name__", None) or repr(t)


def fits(declared: Any, produced: Any) -> bool:
    """A value of type ``produced`` may be given to a parameter of type ``declared``."""
    if declared is Any or produced is Any or declared == produced:
        return True
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        return any(fits(d, produced) for d in typing.get_args(declared))
    classes = isinstance(declared, type) and isinstance(produced, type)
    return classes and issubclass(produced, declared)


def _accepts_none(declared: Any) -> bool:
    return declared is Any or declared is None or fits(declared, type(None))


class Step:
    """One step of a workflow: its task, its parents, how it runs."""

    def __init__(
        self,
        workflow: Workflow,
        fn: Callable[..., Any],
        parents: list[str],
        fan_out: bool,
        trigger: str,
    ) -> None:
        self.workflow, self.fn, self.name = workflow, fn, fn.__name__
        self.parents, self.fan_out, self.trigger = parents, fan_out, trigger
        hints = get_type_hints(fn, include_extras=True)
        self.returns: Any = hints.get("return", Any)
        self.ctx_param: str | None = None
        #: (name, type) of each parameter that takes a parent's result (or a start argument)
        self.params: list[tuple[str, Any]] = []
        for p in inspect.signature(fn).parameters.values():
            t = hints.get(p.name, Any)
            if t is RunContext:
                self.ctx_param = p.name
            else:
                self.params.append((p.name, t))
        self.task: Task  # set by Workflow.step

    @property
    def produces(self) -> Any:
        """What its dependents get: its return type, or the list of them when it fans out."""
        return list[self.returns] if self.fan_out else self.returns  # type: ignore[name-defined]

    def spec(self) -> StepSpec:
        params = tuple(name for name, _ in self.params) if self.parents else ()
        return StepSpec(
            self.name,
            self.task.name,
            self.task.queue,
            tuple(self.parents),
            params,
            self.fan_out,
            self.trigger,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function here and now (no broker, no run)."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Step {self.workflow.name}.{self.name} parents={self.parents}>"


class Workflow(RunAPI):
    """A named DAG of steps on an App (``app.workflow(name)``). Its runs live in the broker's
    own store (memory://, sqlite://, postgresql://). Runs are started, read and resumed by the
    methods it has from ``fastq.workflow.api.RunAPI``: ``start``, ``status``, ``result``,
    ``resume``; an ended run is kept ``keep`` seconds (None: until ``forget``)."""

    def __init__(self, app: App, name: str, keep: float | None) -> None:
        self.app, self.name, self.keep = app, name, keep
        self.steps: dict[str, Step] = {}
        self.next_expiry = 0.0
        self.expiring = threading.Lock()

    def _error(self, text: str) -> ConfigError:
        return ConfigError(f"workflow {self.name}: {text}")

    def step(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        depends_on: Sequence[Step | str] = (),
        fan_out: bool = False,
        retry_attempts: int = 0,
        retry_delay: float = 1.0,
        trigger: str = "all_success",
        **options: Any,
    ) -> Any:
        """Register a step (``async def`` or plain) as a task of the App; use bare or with
        options.

        Parameters:
            depends_on: the steps that end before it starts (Step objects, or names of steps
                defined before it). Each parameter is named after a parent and gets its result
                (a parameter annotated ``fastq.RunContext`` gets the run's context); a root step
                (no parents) takes the arguments of ``start``.
            fan_out: run once per element of its one parent's list, in parallel; its dependents
                get the list of its results, in element order.
            retry_attempts: runs again after a failure, at most this many times (then the step
                fails, and the run with it); ``retry_delay`` seconds before the first retry,
                doubling each time, with jitter (the task's ``retry_backoff``).
            trigger: ``"all_success"`` (a parent that did not end done skips the step) or
                ``"all_done"`` (it runs once every parent ended; a parent that did not end done
                gives None: such parameters must accept None).
            options: the task's options (``queue``, ``kind``, ``timeout``, ``concurrency``...).

        Raises:
            ConfigError: a parent that is not a step of this workflow, a parameter that names
                none of the parents, a type that does not match, a fan-out over something
                that is not a list, or an option out of range.
        """
        taken = sorted({"name", "max_retries", "retry_backoff"} & set(options))
        if taken:
            raise self._error(
                f"{', '.join(taken)} cannot be given to a step: its task is named "
                "wf.<workflow>.<step>, and retries are retry_attempts= and retry_delay="
            )
        if trigger not in TRIGGERS:
            raise self._error(f"trigger={trigger!r} is none of {TRIGGERS}")
        if not isinstance(retry_attempts, int) or retry_attempts < 0:
            raise self._error(f"retry_attempts must be an int >= 0, got {retry_attempts!r}")

        def register(fn: Callable[..., Any]) -> Step:
            parents = [p.name if isinstance(p, Step) else str(p) for p in depends_on]
            step = Step(self, fn, parents, fan_out, trigger)
            if step.name in self.steps:
                raise self._error(f"a step named {step.name} is defined already; rename one")
            self._check(step, depends_on)
            register_task = self.app.task(
                name=f"wf.{self.name}.{step.name}",
                max_retries=retry_attempts,
                retry_backoff=retry_delay,
                **options,
            )
            step.task = register_task(wrap(fn, step.params, step.ctx_param, step.returns))
            self.steps[step.name] = step
            return step

        return register(fn) if fn is not None else register

    def _check(self, step: Step, depends_on: Sequence[Step | str]) -> None:
        """A step's parents exist (defined before it: so no cycle), its parameters name them
        with matching types, its fan-out is over a list."""
        where = f"step {step.name}"
        for p in depends_on:
            if isinstance(p, Step) and p.workflow is not self:
                raise self._error(
                    f"{where} depends on {p.name} of workflow {p.workflow.name}; a step depends "
                    "on steps of its own workflow"
                )
        for name in step.parents:
            if name == step.name:
                raise self._error(f"{where} depends on itself; a workflow is a DAG")
            if name not in self.steps:
                raise self._error(
                    f"{where} depends on {name!r}, which is no step of this workflow yet; "
                    "define each step after the steps it depends on"
                )
        if not step.parents:
            if step.fan_out:
                raise self._error(f"{where} fans out but has no parent; give it depends_on=[...]")
            return
        if step.fan_out and len(step.parents) != 1:
            raise self._error(
                f"{where} fans out over {len(step.parents)} parents {step.parents}; fan out "
                "over one parent's list"
            )
        for pname, declared in step.params:
            if pname not in step.parents:
                raise self._error(
                    f"{where} parameter {pname} names none of its parents {step.parents}; name "
                    "each parameter after a parent (or annotate it fastq.RunContext)"
                )
            parent = self.steps[pname]
            produced = parent.produces
            if step.fan_out:
                if typing.get_origin(produced) is not list:
                    raise self._error(
                        f"{where} parameter {pname} fans out over {pname}, which returns "
                        f"{type_name(produced)}, not a list; return list[...] from {pname} or "
                        "drop fan_out=True"
                    )
                (produced,) = typing.get_args(produced)
            if step.trigger == "all_done" and not _accepts_none(declared):
                raise self._error(
                    f"{where} parameter {pname}: expected {type_name(produced)} | None "
                    f"(trigger='all_done' gives None when {pname} did not end done), got "
                    f"{type_name(declared)}; annotate it {type_name(produced)} | None"
                )
            if not fits(declared, produced):
                fanned = (
                    f" ({pname} fans out: its dependents get the list of its results)"
                    if parent.fan_out
                    else ""
                )
                raise self._error(
                    f"{where} parameter {pname}: expected {type_name(produced)}{fanned}, got "
                    f"{type_name(declared)}; make the annotation match what {pname} returns"
                )
        if step.fan_out and not step.params:
            raise self._error(
                f"{where} fans out over {step.parents[0]} but takes no parameter named "
                f"{step.parents[0]}; add one for the element"
            )

    def graph(self) -> Graph:
        """The steps as a run stores them."""
        if not self.steps:
            raise self._error("has no steps; define them with @wf.step")
        return Graph(tuple(s.spec() for s in self.steps.values()))

    def roots(self) -> list[Step]:
        return [s for s in self.steps.values() if not s.parents]

    def sinks(self) -> list[Step]:
        parents = {p for s in self.steps.values() for p in s.parents}
        return [s for s in self.steps.values() if s.name not in parents]

    def __repr__(self) -> str:
        return f"<Workflow {self.name} steps={list(self.steps)}>"
