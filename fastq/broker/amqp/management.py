"""RabbitMQ's HTTP management API, for what AMQP cannot say: the unacked messages of a queue on
every host (``queue.declare`` counts only the ready ones)."""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request

#: seconds a management request may take
TIMEOUT = 2.0


def unacked_everywhere(aiormq_url: str, port: int, port_given: bool, queue: str) -> int | None:
    """Unacked messages of ``queue`` on every host, from the management API on ``port`` with the
    URL's credentials; None when it does not answer (not enabled, not reachable), or when AMQP
    runs over TLS and the port was not given (credentials go over plain HTTP only where AMQP
    itself was plain, or when asked)."""
    parts = urllib.parse.urlsplit(aiormq_url)
    if parts.scheme.lower() == "amqps" and not port_given:
        return None
    vhost = urllib.parse.quote(urllib.parse.unquote(parts.path[1:]) or "/", safe="")
    api = f"http://{parts.hostname}:{port}/api/queues/{vhost}/{urllib.parse.quote(queue, safe='')}"
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(api, headers={"Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return int(json.load(response).get("messages_unacknowledged", 0))
    except (OSError, ValueError):  # the caller says whose count it is
        return None
