"""Task and Consumer: registered handlers, their options, and how their messages are made and read.

A task's parameters are typed (msgspec Structs, builtins); ``send`` validates the arguments
against them before anything is published, and the worker validates again on decode, because a
queue may hold messages from producers that are not this code. No pickle anywhere.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, get_type_hints

import msgspec

from fastq import message, schedule
from fastq.broker.base import UNIQUE_HEADER, Message
from fastq.calls import Calls
from fastq.config import HandlerOptions, Route
from fastq.errors import ConfigError, MessageError
from fastq.middleware import Sending

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


#: send's own options: a task parameter may not take one of these names
RESERVED = ("delay", "eta", "unique_key", "connection")

_value_encoder = msgspec.msgpack.Encoder()


class _Produces:
    """What tasks and consumers share: the return type, and what their return value becomes
    (kept, published to ``publish_to``)."""

    name: str
    options: HandlerOptions
    returns: Any
    publish_to: str | Route | Task | None

    def _returns(self, fn: Callable[..., Any]) -> None:
        self.returns = get_type_hints(fn, include_extras=True).get("return", Any)
        self.result_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(self.returns)
        #: the worker checks what the handler returned against its return annotation
        self.checks_return = self.returns is not Any

    def _set_publish_to(self, publish_to: str | Route | Task | None) -> None:
        if publish_to is not None and not isinstance(publish_to, (str, Route, Task)):
            raise ConfigError(
                f"{self.name}: publish_to must be a queue name, a fastq.Route or a Task, got "
                f"{type(publish_to).__name__}"
            )
        if isinstance(publish_to, str) and not publish_to:
            raise ConfigError(f"{self.name}: publish_to must be a non-empty queue name")
        if isinstance(publish_to, Task):
            params = list(publish_to.signature.parameters.values())
            if len(params) != 1:
                raise ConfigError(
                    f"{self.name}: publish_to={publish_to.name} takes {len(params)} arguments; "
                    "the return value becomes the one argument of the task it is published to"
                )
            expected = publish_to.args_type.__args__[0]
            if not _fits(self.returns, expected):
                raise ConfigError(
                    f"{self.name} returns {_type_name(self.returns)}, but publish_to="
                    f"{publish_to.name} takes {params[0].name}: {_type_name(expected)}; "
                    "make the return annotation match the parameter"
                )
        self.publish_to = publish_to

    def encode_value(self, value: Any, limit: int) -> bytes:
        """The return value as msgpack, checked against the return annotation.

        Raises:
            MessageError: it does not encode, does not fit the annotation, or is over ``limit``
                bytes (the message says which, and the setting that raises the limit).
        """
        try:
            raw = _value_encoder.encode(value)
            if self.checks_return:
                self.result_decoder.decode(raw)
        except (TypeError, msgspec.ValidationError) as e:
            raise MessageError(
                f"{self.name} returned a {type(value).__name__} that does not encode as its "
                f"return annotation {_type_name(self.returns)} says ({e}); return msgspec "
                "Structs or builtins of that type"
            ) from e
        _check_size(self.name, value, len(raw), limit)
        return raw

    def outputs(
        self, value: Any, limit: int, encoded: bytes | None = None
    ) -> list[tuple[str, str, bytes]]:
        """What ``value`` publishes to ``publish_to``, as ``(queue, message id, body)`` (queue ""
        for a ``Route``): for a task, one message with the value as its argument; for a queue
        name, a ``bytes`` value as it is (a list or tuple of them: one message each), None
        nothing, any other value its msgpack (``encoded``, when the caller has it already).

        Raises:
            MessageError: the value does not encode or is too large (the message says why).
        """
        target = self.publish_to
        if target is None:
            return []
        if isinstance(target, Task):
            try:
                m = target.message(value)
            except (msgspec.ValidationError, MessageError, TypeError) as e:
                raise MessageError(
                    f"{self.name} returned what {target.name} cannot take as its argument: {e}"
                ) from e
            _check_size(self.name, value, len(m.body), limit)
            return [(target.queue, m.message_id, m.body)]
        if value is None:
            return []
        if isinstance(value, (bytes, bytearray, memoryview)):
            bodies = [bytes(value)]
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, (bytes, bytearray, memoryview)) for v in value
        ):
            bodies = [bytes(v) for v in value]
        else:
            bodies = [encoded if encoded is not None else self.encode_value(value, limit)]
        for body in bodies:
            _check_size(self.name, value, len(body), limit)
        queue = target if isinstance(target, str) else ""
        return [(queue, message.new_id(), body) for body in bodies]


def _check_size(name: str, value: Any, size: int, limit: int) -> None:
    if size > limit:
        raise MessageError(
            f"{name} returned a {type(value).__name__} of {size} bytes encoded, over "
            f"max_message_bytes={limit}; return less, or raise Config(max_message_bytes=...)"
        )


def _fits(returns: Any, expected: Any) -> bool:
    if expected is Any or returns == expected:
        return True
    classes = isinstance(returns, type) and isinstance(expected, type)
    return classes and issubclass(returns, expected)


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or repr(t)


class Task(_Produces, Calls):
    """A function registered with ``@app.task``: call it directly, or ``send`` it to a worker."""

    def __init__(
        self,
        app: App,
        fn: Callable[..., Any],
        name: str,
        options: HandlerOptions,
        publish_to: str | Route | Task | None = None,
        *,
        unique: bool = False,
        unique_for: float | None = None,
    ) -> None:
        self.app, self.fn, self.name, self.options = app, fn, name, options
        #: ``unique=True``: a send whose arguments equal a queued or running one's enqueues nothing
        self.unique = unique
        #: seconds a unique key holds at most (None: until its message is acked or dead-lettered)
        self.unique_for = unique_for
        if unique_for is not None and not (isinstance(unique_for, (int, float)) and unique_for > 0):
            raise ConfigError(f"task {name}: unique_for must be seconds > 0, got {unique_for!r}")
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
            if p.name in RESERVED:
                raise ConfigError(
                    f"task {name}: parameter {p.name!r} has the name of one of send()'s own "
                    f"options {RESERVED}; rename the parameter (e.g. {p.name}_)"
                )
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
        self._returns(fn)
        self._set_publish_to(publish_to)

    @property
    def queue(self) -> str:
        return self.options.queue

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function here and now (no broker involved)."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue!r} kind={self.options.kind}>"

    # -- producing --------------------------------------------------------------------------

    def message(self, *args: Any, _headers: dict[str, str] | None = None, **kwargs: Any) -> Message:
        """The broker message for one call, arguments validated against the parameter types.

        Raises:
            TypeError: the arguments do not fit the signature.
            msgspec.ValidationError: an argument has the wrong type (the path says which).
        """
        return self._message(args, kwargs, _headers)[0]

    def _message(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: dict[str, str] | None
    ) -> tuple[Message, msgspec.Raw]:
        """``message``, and the encoded arguments (a unique task's key is made from them)."""
        args, raw = self.checked(args, kwargs)
        if headers is None and self.options.result_ttl is not None:
            headers = self._notify_headers()
        return self._encoded(args, headers), raw

    def checked(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], msgspec.Raw]:
        """The arguments of one call in parameter order, and encoded, validated against the
        parameter types as the worker will decode them (no hook sees them here).

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
        return args, raw

    def _encoded(
        self, args: tuple[Any, ...], headers: dict[str, str] | None, message_id: str | None = None
    ) -> Message:
        """The envelope of one call, after the ``before_send`` hooks saw it (they may add
        headers). A ``message_id`` given here is kept whatever a hook does (a tick's id is what
        makes it once)."""
        send_hooks = self.app.hooks.send
        if not send_hooks:
            message_id, body = message.encode(
                self.name, args, message_id=message_id, headers=headers
            )
            return Message(body, message_id, headers)
        headers = dict(headers) if headers else {}  # they may add headers: before the encoding
        sending = Sending(
            self.name, message_id or message.new_id(), self.queue, headers, time.time()
        )
        for hook in send_hooks:
            hook(sending)
        message_id, body = message.encode(
            self.name,
            args,
            message_id=message_id or sending.message_id,
            headers=headers or None,
            enqueued_at=sending.enqueued_at,
        )
        return Message(body, message_id, headers or None)

    def tick_message(self, sched: schedule.Schedule, tick: float) -> Message:
        """The message of one tick of this periodic task: its fixed arguments, the tick in a
        header (``schedule.TICK_HEADER``) and in its id (``Schedule.message_id``); the
        ``before_send`` hooks see it as they see a send."""
        return self._encoded(
            sched.args, {schedule.TICK_HEADER: repr(tick)}, message_id=sched.message_id(tick)
        )

    def send(
        self,
        *args: Any,
        delay: float | None = None,
        eta: dt.datetime | None = None,
        unique_key: str | None = None,
        connection: object | None = None,
        **kwargs: Any,
    ) -> str:
        """Publish one call; returns its message id once the broker holds it.

        Parameters:
            delay: seconds before it may run (it waits in the broker, not in a worker).
            eta: the time from which it may run (timezone-aware).
            unique_key: enqueue nothing while a message with this key is queued or running
                (then the id returned is that message's); ``unique=True`` on the task makes
                the key from its name and arguments.
            connection: the caller's open database connection: enqueue inside its transaction
                (PostgreSQL broker).

        Raises:
            ConfigError: a naive ``eta``, a negative ``delay``, both; ``connection`` on a broker
                without it; a unique send on a broker that keeps no keys (RabbitMQ without
                ``App(result_store=...)``).
        """
        m = self._sending(args, kwargs, delay, eta, unique_key)
        if connection is not None:
            self._no_unique_in(m)
            self.app.broker.publish_in_sync(connection, self.queue, [m])
            return m.message_id
        if m.unique_key is not None:
            return self._publish_unique(m)
        self.app.broker.publish_sync(self.queue, [m])
        return m.message_id

    async def send_async(
        self,
        *args: Any,
        delay: float | None = None,
        eta: dt.datetime | None = None,
        unique_key: str | None = None,
        connection: object | None = None,
        **kwargs: Any,
    ) -> str:
        """``send`` for coroutines: the publish runs off the event loop (``connection``: an
        asyncpg connection, awaited on it)."""
        m = self._sending(args, kwargs, delay, eta, unique_key)
        if connection is not None:
            self._no_unique_in(m)
            await self.app.broker.publish_in(connection, self.queue, [m])
            return m.message_id
        loop = asyncio.get_running_loop()
        if m.unique_key is not None:
            return await loop.run_in_executor(None, self._publish_unique, m)
        await loop.run_in_executor(None, self.app.broker.publish_sync, self.queue, [m])
        return m.message_id

    def _sending(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        delay: float | None,
        eta: dt.datetime | None,
        unique_key: str | None,
    ) -> Message:
        seconds = schedule.delay_of(self.name, delay, eta)
        m, raw = self._message(args, kwargs, None)
        key = unique_key
        if key is None and self.unique:
            key = f"{self.name}:{hashlib.blake2b(raw, digest_size=16).hexdigest()}"
        if key is None:
            return msgspec.structs.replace(m, delay=seconds) if seconds else m
        if not isinstance(key, str) or not key:
            raise ConfigError(f"task {self.name}: unique_key must be a non-empty str, got {key!r}")
        headers = {**(m.headers or {}), UNIQUE_HEADER: key}
        return msgspec.structs.replace(
            m, delay=seconds, headers=headers, unique_key=key, unique_for=self.unique_for
        )

    def _no_unique_in(self, m: Message) -> None:
        if m.unique_key is not None:
            raise ConfigError(
                f"task {self.name}: a unique send cannot enqueue in the caller's transaction "
                "(the key would be held by a message that may roll back); drop connection= or "
                "the unique key"
            )

    def _publish_unique(self, m: Message) -> str:
        """A unique send: the broker's own keys, else the App's result store holds them (the
        supervisor frees a key when its message is acked or dead-lettered)."""
        broker = self.app.broker
        if broker.keeps_unique_keys:
            return broker.publish_unique_sync(self.queue, m)
        if self.app.result_store_url is None:
            raise ConfigError(
                f"task {self.name}: a unique send needs a place that keeps the keys; "
                f"{broker.url} keeps none: give the App a result store, "
                "App(..., result_store='sqlite:///results.db')"
            )
        store = self.app.result_store
        assert m.unique_key is not None
        holder = store.claim_unique(m.unique_key, m.message_id, m.unique_for)
        if holder != m.message_id:
            return holder
        try:
            broker.publish_sync(self.queue, [m])
        except BaseException:
            store.free_unique_sync([(m.unique_key, m.message_id)])
            raise
        return m.message_id

    def send_many(
        self, calls: Iterable[tuple[Any, ...]], connection: object | None = None
    ) -> list[str]:
        """Publish many calls (each a tuple of positional arguments) in one batch; their ids.
        ``connection``: inside the caller's transaction, as ``send``'s. A unique task's calls
        are sent one by one (each returns its key's holder)."""
        if self.unique:
            return [self.send(*args, connection=connection) for args in calls]
        messages = [self.message(*args) for args in calls]
        if connection is not None:
            self.app.broker.publish_in_sync(connection, self.queue, messages)
        elif messages:
            self.app.broker.publish_sync(self.queue, messages)
        return [m.message_id for m in messages]

    async def send_many_async(
        self, calls: Iterable[tuple[Any, ...]], connection: object | None = None
    ) -> list[str]:
        """``send_many`` for coroutines (``connection``: an asyncpg connection)."""
        if self.unique:
            return [await self.send_async(*args, connection=connection) for args in calls]
        messages = [self.message(*args) for args in calls]
        if connection is not None:
            await self.app.broker.publish_in(connection, self.queue, messages)
        elif messages:
            await asyncio.get_running_loop().run_in_executor(
                None, self.app.broker.publish_sync, self.queue, messages
            )
        return [m.message_id for m in messages]

    # -- consuming --------------------------------------------------------------------------

    def decode_args(self, raw: bytes | memoryview) -> tuple[Any, ...]:
        """The arguments of an envelope, validated (msgspec.ValidationError when they do not
        fit)."""
        args: tuple[Any, ...] = self._decoder.decode(raw)
        return args


class Consumer(_Produces):
    """A handler registered with ``@app.consumer(queue)``: gets the raw body of every message."""

    def __init__(
        self,
        app: App,
        fn: Callable[[bytes], Any],
        options: HandlerOptions,
        publish_to: str | Route | Task | None = None,
    ) -> None:
        self.app, self.fn, self.options = app, fn, options
        self.name = f"{module_name(fn)}.{fn.__qualname__}"
        self.is_async = inspect.iscoroutinefunction(fn)
        if options.result_ttl is not None:
            raise ConfigError(
                f"consumer {self.name}: result_ttl is for tasks (a consumer's messages come from "
                "other programs, which read no fastq results); use publish_to, or a task"
            )
        self._returns(fn)
        self._set_publish_to(publish_to)

    @property
    def queue(self) -> str:
        return self.options.queue

    def __call__(self, body: bytes) -> Any:
        return self.fn(body)

    def __repr__(self) -> str:
        return f"<Consumer {self.name} queue={self.queue!r} kind={self.options.kind}>"
