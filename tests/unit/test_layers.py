"""The import direction of ../shared/STYLE.md §2, as a test (trio's test_exports, uvloop's
test_sourcecode): each module imports only from its row, each heavy dependency is imported by
exactly one module, there is no import circle, and ``import fastq`` loads none of them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fastq

PACKAGE = Path(fastq.__file__).parent

# fmt: off
_CORE = {"errors", "_layout", "_segment"}
_RUNTIME = {"wire", "codec", "ring", "message", "middleware", "config", "errors", "_aio",
            "autosize.topology", "_load", "results"}
_ENGINE = {"worker", "wire", "ring", "autosize", "broker.base", "config", "errors", "_aio",
           "_notify"}
_AMQP = {"broker.base", "message", "errors", "config", "ring"}
_AMQP_ROOMS = {"broker.amqp.stream", "broker.amqp.channel", "broker.amqp.outbox",
               "broker.amqp.connection",
               "broker.amqp.publish", "broker.amqp.consumer", "broker.amqp.settle",
               "broker.amqp.management", "broker.amqp.replies", "broker.amqp.leader",
               "broker.amqp.dlq"}

#: module -> the fastq modules it may import (STYLE.md §2). A row may name a package: then its
#: modules may be imported too.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    # the one masking function for URLs in logs and errors
    "url": set(),
    "config": {"errors", "url"},
    "message": {"errors"},
    "_layout": {"errors"},
    # the segment's and the wake-up sockets' life cycle, shared by both ring implementations
    "_segment": {"errors", "_layout"},
    "_core_py": _CORE,
    "_core": _CORE,
    "ring": {"_core", "_core_py", "_layout", "_segment", "errors"},
    # AMQP frames off a consuming connection's socket: the extension and its twin
    "_amqp_py": {"errors"},
    "_amqp": {"errors"},
    "wire": {"ring", "message", "errors"},
    "codec": {"ring", "message", "errors"},
    "_aio": {"errors"},
    # wake-ups for result waiters (a datagram socket per waiting process)
    "_notify": set(),
    # what a handler returned, as it is kept and read
    "results": {"errors", "_notify"},
    # periodic schedules and delays: values and next-fire math (cronsim imported lazily)
    "schedule": {"errors"},
    # module:attribute -> object, for the cli and for a worker loading its app and executor
    "_load": {"errors"},
    "autosize": {"autosize.topology", "autosize.plan", "autosize.share", "autosize.look",
                 "autosize.rules", "autosize.controller"},
    # the cores the fastq processes of one host claimed (files in the runtime dir)
    "autosize.claims": {"_segment"},
    "autosize.topology": {"config", "errors"},
    "autosize.plan": {"autosize.topology", "config", "errors"},
    "autosize.share": {"autosize.plan"},
    "autosize.look": set(),
    "autosize.rules": {"autosize.plan", "autosize.look"},
    "autosize.controller": {"autosize.plan", "autosize.look", "autosize.rules", "config",
                            "errors"},
    # QueueOptions is a setting (config); the broker interface re-exports it
    # workflows (issue 16): the package imports nothing; state is the run's values and the
    # storage protocol, run the pure state machine the brokers drive in the ack's transaction,
    # context what a step's handler sees, api and graph the user's side
    "workflow": set(),
    "workflow.state": set(),
    "workflow.run": {"workflow.state", "message", "results"},
    "workflow.context": set(),
    "workflow.api": {"workflow.run", "workflow.state", "workflow.context", "workflow.relay",
                     "message", "broker.base", "errors"},
    "workflow.relay": {"broker.base"},
    "workflow.graph": {"workflow.api", "workflow.context", "workflow.state", "errors"},
    "broker.base": {"message", "errors", "_aio", "config", "url", "workflow.state"},
    "broker.memory": {"broker.base", "message", "errors", "results", "workflow.run",
                      "workflow.state"},
    "broker.sqlite": {"broker.base", "broker.sqlite_sql", "broker.sqlite_storage", "message",
                      "broker.sqlite_wake",
                      "errors", "results", "broker.sqlite_runs", "workflow.run", "workflow.state"},
    # the SQLite broker's workflow tables and its RunTx
    "broker.sqlite_runs": {"workflow.state", "workflow.run"},
    "broker.sqlite_sql": set(),
    # what the SQLite file's storage errors mean, in words
    "broker.sqlite_storage": {"errors"},
    # a send wakes the consuming brokers of the same file in other processes (abstract sockets)
    "broker.sqlite_wake": set(),
    "broker.amqp": {"broker.amqp.broker"},
    # the PostgreSQL broker (the only asyncpg importer) and its SQL text
    "broker.postgres": {"broker.base", "broker.postgres_sql", "broker.postgres_sync", "message",
                        "errors", "results", "broker.postgres_runs", "workflow.run",
                        "workflow.state"},
    "broker.postgres_sync": {"broker.base", "broker.postgres_sql", "results"},
    "broker.postgres_sql": {"broker.base", "errors"},
    # the PostgreSQL broker's workflow tables and its RunTx (on the connection it is given)
    "broker.postgres_runs": {"broker.base", "workflow.state"},
    "broker.amqp.broker": _AMQP | _AMQP_ROOMS,
    # the consuming connection: its frames read by _amqp (or its twin), the rare ones by pamqp
    "broker.amqp.stream": {"_amqp", "_amqp_py", "errors", "broker.amqp.channel"},
    # one channel of it: its synchronous methods, its coalesced acks
    "broker.amqp.channel": {"errors"},
    # confirmed publishes on that connection: frames encoded here (field tables by pamqp)
    "broker.amqp.outbox": {"broker.amqp.stream"},
    "broker.amqp.connection": _AMQP | {"broker.amqp.stream", "broker.amqp.outbox"},
    "broker.amqp.publish": _AMQP | {"broker.amqp.connection", "broker.amqp.outbox"},
    "broker.amqp.consumer": _AMQP | {"broker.amqp.connection", "broker.amqp.stream",
                                     "broker.amqp.channel"},
    "broker.amqp.settle": _AMQP | {"broker.amqp.connection", "broker.amqp.publish",
                                   "broker.amqp.consumer"},
    "broker.amqp.management": set(),
    # the periodic scheduler's leader: a single-active-consumer queue's token, and the record
    # of the last ticks in a queue of length 1
    "broker.amqp.leader": _AMQP | {"broker.amqp.connection"},
    # direct reply-to: the caller's side of task.call, and the supervisor's replies
    "broker.amqp.replies": _AMQP | {"broker.amqp.connection", "broker.amqp.publish"},
    # dead letters read, requeued and purged in <queue>.dlq (fastq dlq, fastq purge)
    "broker.amqp.dlq": _AMQP | {"broker.amqp.connection", "broker.amqp.publish",
                                "broker.amqp.consumer", "broker.amqp.settle"},
    "broker": {"broker.base", "broker.memory", "broker.sqlite", "broker.amqp", "broker.postgres",
               "errors"},
    "middleware": {"message", "errors", "_hooks", "_hooks_py"},
    # the JSON log lines of --log-format json (installed by cli, and by a worker told so)
    "logs": set(),
    # the record a hook sees, and what a worker counts for /metrics on the hooks (Report.TALLY),
    # compiled, and their twin: they import nothing of fastq
    "_hooks": set(),
    "_hooks_py": set(),
    "tally": {"wire", "_hooks", "_hooks_py"},
    # OpenTelemetry spans on the middleware hooks (the only opentelemetry importer)
    "tracing": {"middleware", "errors"},
    "worker": _RUNTIME | {"logs"},
    "executors": set(),
    "executors.app": _RUNTIME | {"tally", "logs", "workflow.relay"},
    "executors.pool": _RUNTIME,
    # worker only as the target a fleet member is spawned with
    "engine": set(),
    "engine.fleet": _ENGINE,
    "engine.placement": _ENGINE | {"engine.fleet"},
    "engine.pump": _ENGINE | {"engine.fleet", "engine.outbox", "results", "workflow.state"},
    "engine.tuning": _ENGINE | {"engine.placement", "engine.pump"},
    "engine.statistics": set(),
    # the periodic scheduler: each tick of the App's schedules, once, through the broker
    "engine.scheduler": _ENGINE | {"schedule"},
    # fastq inspect's socket: the supervisor's server and the command's client
    "engine.inspect": set(),
    "engine.supervisor": _ENGINE | {"engine.fleet", "engine.placement", "engine.pump",
                                    "engine.tuning", "engine.statistics", "engine.scheduler",
                                    "engine.inspect", "logs", "metrics"},
    # the supervisor's side of a result store's workflow outbox: record, let go, sweep
    "engine.outbox": _ENGINE,
    # the supervisor's Prometheus /metrics (the only prometheus_client importer): the workers'
    # tallies (wire) and the engine's statistics, passed in by the supervisor
    "metrics": {"wire", "config", "errors", "autosize.topology"},
    "pool": {"engine.fleet", "wire", "codec", "ring", "autosize", "config", "errors",
             "pool.driver", "pool.job", "pool.results"},
    "pool.job": {"codec", "autosize", "config", "errors"},
    "pool.results": {"pool.job"},
    "pool.batches": {"engine.fleet", "wire", "codec", "ring", "errors", "pool.job"},
    "pool.driver": {"engine.fleet", "wire", "codec", "ring", "autosize", "config", "errors",
                    "pool.job", "pool.batches"},
    "task": {"config", "message", "middleware", "broker", "broker.base", "errors", "results",
             "schedule", "calls"},
    # a task's result() and call(): waiting for what its messages return
    "calls": {"_notify", "results", "broker.base", "config"},
    "app": {"config", "message", "middleware", "broker", "task", "engine.supervisor", "errors",
            "schedule", "inline", "workflow.graph"},
    # an app's messages run in this process through the workers' handler path: drain() and
    # the eager sends of App.testing(eager=True)
    "inline": {"executors.app", "wire", "broker", "broker.base", "broker.memory", "message",
               "errors", "workflow.state"},
    "testing": {"app", "broker", "broker.base", "config", "errors", "inline"},
    # the pytest plugin (entry point pytest11): fixtures over testing and App.testing
    "pytest_plugin": {"testing", "app", "_load", "errors"},
    # fastq dlq / purge / inspect: what they do, beside cli (which only parses)
    "admin": {"app", "broker", "broker.base", "message", "engine.inspect", "errors", "_load"},
    "cli": {"app", "task", "config", "autosize", "engine.supervisor", "testing", "_load", "_bench",
            "broker", "errors", "admin", "logs", "runs"},
    # fastq runs: a workflow app's runs listed, shown, resumed
    "runs": {"app", "_load", "errors", "workflow.api"},
    # the `fastq bench` suites sit beside cli and drive what they measure
    "_bench": {"app", "config", "autosize", "engine.supervisor", "testing", "ring", "_aio",
               "broker.base", "errors", "__init__", "_bench", "url"},
    "__main__": {"cli"},
    "__init__": {"errors", "app", "task", "pool", "config", "middleware", "workflow.context"},
}
#: Third-party modules and the one fastq module allowed to import each (``_bench`` measures a
#: raw aiormq consumer as the broker's ceiling: that baseline is aiormq's).
HEAVY = {
    "aiormq": {"broker.amqp.connection", "broker.amqp.publish", "broker.amqp.consumer",
               "broker.amqp.settle", "broker.amqp.broker", "broker.amqp.replies",
               "broker.amqp.leader", "broker.amqp.dlq", "_bench"},
    "pamqp": {"broker.amqp.stream", "broker.amqp.channel", "broker.amqp.outbox",
              "broker.amqp.publish", "broker.amqp.dlq",
              "broker.amqp.settle", "broker.amqp.replies", "_bench"},
    "uvloop": {"_aio"},
    "asyncpg": {"broker.postgres", "_bench"},
    # (``_bench`` reads the process trees it measures)
    "psutil": {"autosize.topology", "_bench"},
    # cron expressions, imported when a cron schedule is made
    "cronsim": {"schedule"},
    # the metrics extra, imported when a supervisor serves /metrics
    "prometheus_client": {"metrics"},
    # the otel extra, imported with fastq.tracing
    "opentelemetry": {"tracing"},
}
# fmt: on


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.pyx")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
        yield ".".join(parts), path


def _tree(path: Path) -> ast.Module:
    source = path.read_text()
    if path.suffix == ".pyx":  # only the Python-level imports of the extension matter here
        source = "\n".join(
            line
            for line in source.splitlines()
            if line.startswith(("import ", "from ")) and "cimport" not in line
        )
    tree = ast.parse(source)
    for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` never run: leave them out
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    return tree


def _imported(node: ast.AST) -> set[str]:
    found = set()
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "fastq":
            found |= {a.name for a in node.names}
        elif node.module.startswith("fastq."):
            module = node.module[len("fastq.") :]
            base = PACKAGE.joinpath(*module.split("."))
            for a in node.names:  # `from fastq.pkg import submodule` imports the submodule
                sub = base / a.name
                is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                found.add(f"{module}.{a.name}" if is_module else module)
        else:
            found.add("!" + node.module.split(".")[0])
    elif isinstance(node, ast.Import):
        for a in node.names:
            found.add(
                a.name[len("fastq.") :]
                if a.name.startswith("fastq.")
                else "!" + a.name.split(".")[0]
            )
    return found


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(_tree(path)):
        found |= _imported(node)
    return found


def _group(name: str) -> str:
    return "_bench" if name.startswith("_bench") else name


def _allowed(key: str, target: str) -> bool:
    """``target`` is in ``key``'s row, or its package is (a row may name a whole package)."""
    parts = target.split(".")
    return target == key or any(
        ".".join(parts[:n]) in ALLOWED[key] for n in range(1, len(parts) + 1)
    )


def test_every_module_has_a_row():
    missing = [name for name, _ in _modules() if _group(name) not in ALLOWED]
    assert missing == [], "add these to ALLOWED here and to STYLE.md §2"


def test_fastq_modules_import_only_downward():
    wrong = []
    for name, path in _modules():
        key = _group(name)
        for imported in _imports(path):
            if imported.startswith("!"):
                users = HEAVY.get(imported[1:])
                if users is not None and key not in users:
                    wrong.append(f"{name} imports {imported[1:]}, which only {sorted(users)} may")
            elif not _allowed(key, _group(imported)):
                wrong.append(f"{name} imports fastq.{imported}")
    assert wrong == []


def test_no_import_circle():
    graph = {
        name: {i for i in _imports(path) if not i.startswith("!")} for name, path in _modules()
    }
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in seen and (found := visit(nxt, [*path, node])):
                return found
        seen[node] = 2
        return None

    for module in sorted(graph):
        if module not in seen:
            assert visit(module, []) is None


def test_import_fastq_loads_no_heavy_dependency():
    heavy = "{'aiormq', 'asyncpg', 'uvloop', 'psutil', 'cronsim', 'prometheus_client', " + (
        "'opentelemetry'}"
    )
    code = f"import fastq, sys; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
