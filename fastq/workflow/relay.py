"""The outbox relay of a process that starts or resumes workflow runs kept apart from their
broker (RabbitMQ with a sqlite:// or postgresql:// result store).

``wf.start`` commits the run, with its root steps' messages in the store's outbox, and hands
those messages here: it returns without waiting for RabbitMQ. A thread of the relay publishes
them, confirmed, in batches (whatever was handed over while the last batch was confirmed), and
only then lets them go from the outbox. So nothing is lost on the way: while the broker refuses
or cannot be reached the messages wait in the store and the relay tries again (every
``RETRY_MAX`` seconds at most); a process that ends normally publishes what it still holds first
(``flush`` at exit, ``EXIT_WAIT`` seconds at most; a worker before it leaves, ``flush_all``);
one killed before leaves them in the outbox, where the app's supervisors publish them (their
sweep, fastq.engine.outbox). A batch published and then not let go (the store failed just then)
goes again from there: a duplicate, which a step bears (the first completion wins).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from fastq.broker.base import Broker, Message, Output

if TYPE_CHECKING:
    from fastq.app import App

logger = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 0.05, 2.0
#: seconds a normal exit waits for what the relay holds to be published
EXIT_WAIT = 30.0

_relays: weakref.WeakKeyDictionary[App, Relay] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def relay_of(app: App, store: Broker) -> Relay:
    """The app's relay (one per App in this process), started on first use."""
    with _lock:
        relay = _relays.get(app)
        if relay is None:
            relay = _relays[app] = Relay(app.broker, store)
        return relay


def flush_all(timeout: float) -> bool:
    """Wait until every relay of this process published what it holds (a worker leaving: it
    ends with ``os._exit``, which runs no ``atexit``), ``timeout`` seconds at most in all."""
    deadline = time.monotonic() + timeout
    with _lock:
        relays = list(_relays.values())
    done = True
    for r in relays:  # each one, even after one that did not finish
        done = r.flush(max(0.0, deadline - time.monotonic())) and done
    return done


def _forget_after_fork() -> None:
    """A child of ``fork`` has none of its parent's threads: its relays start afresh, and the
    ones it inherited hold nothing (what the parent handed over is the parent's to publish;
    their ``flush`` at the child's exit must not wait for a thread that is not there)."""
    global _lock
    _lock = threading.Lock()
    for relay in list(_relays.values()):
        relay.pending, relay.busy = [], False
        relay.cond = threading.Condition()
    _relays.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


class Relay:
    """Publishes what ``submit`` hands over (outbox id, output) to ``broker``, confirmed, then
    deletes those rows from ``store``'s outbox; see the module docstring."""

    def __init__(self, broker: Broker, store: Broker) -> None:
        self.broker, self.store = broker, store
        #: handed over and not yet published and let go, in the order they came
        self.pending: list[tuple[int, Output]] = []
        self.busy = False  # a batch is being published
        self.failures = 0
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def submit(self, made: list[tuple[int, Output]]) -> None:
        """Publish ``made`` soon (the caller's transaction put them in the outbox)."""
        with self.cond:
            self.pending.extend(made)
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name="fastq-workflow-relay", daemon=True
                )
                self.thread.start()
                atexit.register(self.flush, EXIT_WAIT)
            self.cond.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over was published and let go (True), or ``timeout``
        seconds passed (False, logged: the app's supervisors publish the rest)."""
        with self.cond:
            done = self.cond.wait_for(lambda: not self.pending and not self.busy, timeout)
            left = len(self.pending)
        if not done:
            logger.warning(
                "%d workflow step message(s) were not published to %s within %g s; they wait in "
                "the outbox of %s, where the app's supervisors publish them",
                left,
                self.broker.url,
                timeout or 0.0,
                self.store.url,
            )
        return done

    def _run(self) -> None:
        pause = RETRY_MIN
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.pending))
                batch, self.busy = list(self.pending), True
            try:
                self._publish(batch)
            except Exception as e:  # noqa: BLE001 - they wait in the outbox; tried again
                if self.failures % 30 == 0:
                    logger.warning(
                        "publishing %d workflow step message(s) to %s failed (%s); they wait in "
                        "the outbox of %s and are tried again every %g s at most",
                        len(batch),
                        self.broker.url,
                        e,
                        self.store.url,
                        RETRY_MAX,
                    )
                self.failures += 1
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()
                time.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
                continue
            if self.failures:
                logger.warning(
                    "publishing workflow step messages to %s works again after %d failed tries",
                    self.broker.url,
                    self.failures,
                )
            pause, self.failures = RETRY_MIN, 0
            with self.cond:
                del self.pending[: len(batch)]
                self.busy = False
                self.cond.notify_all()

    def _publish(self, batch: list[tuple[int, Output]]) -> None:
        """One batch: each queue's messages in one confirmed publish, then out of the outbox (a
        failure there is logged: they were published, and the supervisors' sweep publishes
        them again)."""
        by_queue: dict[str, list[Message]] = {}
        for _, o in batch:
            by_queue.setdefault(o.queue, []).append(o.message)
        for queue, messages in by_queue.items():
            self.broker.publish_sync(queue, messages)
        try:
            self.store.outbox_done_sync([i for i, _ in batch])
        except Exception as e:  # noqa: BLE001 - published: only the outbox still holds them
            logger.warning(
                "letting %d published workflow step message(s) go from the outbox of %s "
                "failed (%s); the supervisors' sweep publishes them again",
                len(batch),
                self.store.url,
                e,
            )
