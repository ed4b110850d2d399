"""Task and Consumer: registered handlers, their options, and how their messages are made and read.

A task's parameters are typed (msgspec Structs, builtins); ``send`` validates the arguments
against them before anything is published, and the worker validates again on decode, because a
queue may hold messages from producers that are not this code. No pickle anywhere.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, get_type_hints

import msgspec

from fastq import message
from fastq.broker.base import Message
from fastq.config import HandlerOptions
from fastq.errors import ConfigError

if TYPE_CHECKING:
    from fastq.app import App


def module_name(fn: Callable[..., Any]) -> str:
    """The name workers import ``fn``'s module by, also when it runs as ``python shop.py``
    (there it is ``__main__`` here, but ``shop`` in a worker: the task names must agree)."""
    return importable_name(fn.__module__)


def importable_name(module: str) -> str:
    """``module`` as another process imports it: ``__main__`` becomes the script's own name."""
    if module != "__main__":
        return module
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":  # python -m package.module
        return str(spec.name).removesuffix(".__main__")
    return os.path.splitext(os.path.basename(getattr(main, "__file__", "__main__")))[0]


class Task:
    """A function registered with ``@app.task``: call it directly, or ``send`` it to a worker."""

    def __init__(
        self, app: App, fn: Callable[..., Any], name: str, options: HandlerOptions
    ) -> None:
        self.app, self.fn, self.name, self.options = app, fn, name, options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        #: a call with exactly this many positional arguments needs no binding (-1: always bind,
        #: as a keyword-only parameter cannot be given positionally)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.arity = (
            len(self.signature.parameters)
            if all(p.kind in positional for p in self.signature.parameters.values())
            else -1
        )
        for p in self.signature.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(
                    f"task {name}: *args and **kwargs cannot be typed for the wire; "
                    "declare each parameter with its type"
                )
        hints = get_type_hints(fn, include_extras=True)
        types = tuple(hints.get(p, Any) for p in self.signature.parameters)
        #: the type of the argument tuple, as the worker decodes it
        self.args_type: Any = tuple.__class_getitem__(types) if types else tuple[()]
        self._decoder = msgspec.msgpack.Decoder(self.args_type)

    @property
    def queue(self) -> str:
        return self.options.queue

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function here and now (no broker involved)."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue!r} kind={self.options.kind}>"

    # -- producing --------------------------------------------------------------------------

    def message(self, *args: Any, **kwargs: Any) -> Message:
        """The broker message for one call, arguments validated against the parameter types.

        Raises:
            TypeError: the arguments do not fit the signature.
            msgspec.ValidationError: an argument has the wrong type (the path says which).
        """
        if kwargs or len(args) != self.arity:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = tuple(bound.arguments.values())
        try:
            # Dicts become Structs; then the encoded arguments are decoded with the worker's own
            # typed decoder, because convert() passes Struct instances through unchecked.
            values = msgspec.convert(args, self.args_type, from_attributes=True)
            raw = message.encode_args(values)
            self._decoder.decode(raw)
        except msgspec.ValidationError as e:
            raise msgspec.ValidationError(
                f"task {self.name}: {e} (arguments in parameter order)"
            ) from e
        message_id, body = message.encode(self.name, args)
        return Message(body, message_id)

    def send(self, *args: Any, **kwargs: Any) -> str:
        """Publish one call; returns its message id once the broker holds it."""
        m = self.message(*args, **kwargs)
        self.app.broker.publish_sync(self.queue, [m])
        return m.message_id

    async def send_async(self, *args: Any, **kwargs: Any) -> str:
        """``send`` for coroutines: the publish runs off the event loop."""
        m = self.message(*args, **kwargs)
        await asyncio.get_running_loop().run_in_executor(
            None, self.app.broker.publish_sync, self.queue, [m]
        )
        return m.message_id

    def send_many(self, calls: Iterable[tuple[Any, ...]]) -> list[str]:
        """Publish many calls (each a tuple of positional arguments) in one batch; their ids."""
        messages = [self.message(*args) for args in calls]
        if messages:
            self.app.broker.publish_sync(self.queue, messages)
        return [m.message_id for m in messages]

    # -- consuming --------------------------------------------------------------------------

    def decode_args(self, raw: bytes | memoryview) -> tuple[Any, ...]:
        """The arguments of an envelope, validated (msgspec.ValidationError when they do not
        fit)."""
        args: tuple[Any, ...] = self._decoder.decode(raw)
        return args


class Consumer:
    """A handler registered with ``@app.consumer(queue)``: gets the raw body of every message."""

    def __init__(self, app: App, fn: Callable[[bytes], Any], options: HandlerOptions) -> None:
        self.app, self.fn, self.options = app, fn, options
        self.name = f"{module_name(fn)}.{fn.__qualname__}"
        self.is_async = inspect.iscoroutinefunction(fn)

    @property
    def queue(self) -> str:
        return self.options.queue

    def __call__(self, body: bytes) -> Any:
        return self.fn(body)

    def __repr__(self) -> str:
        return f"<Consumer {self.name} queue={self.queue!r} kind={self.options.kind}>"
