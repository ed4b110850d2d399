"""The one masking function for every URL the product prints: in a log line, an error, a repr.

User info loses its password, and every query parameter whose name looks secret (password,
token, secret, key...) loses its value. A URL too malformed to parse is masked by pattern
instead, never echoed whole. Nothing else in fastq formats a URL for humans.
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["MASK", "looks_secret", "mask_url", "scrub"]

MASK = "***"
#: query parameter names whose values are credentials (compared lowercased, ``-``/``_`` dropped)
_SECRET_WORDS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "auth",
    "credential",
    "privatekey",
    "sslpassword",
    "sessionkey",
)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:?#]*):[^@/?#]*@")
_BARE_USERINFO = re.compile(r"^(?P<user>[^/@:]*):[^@/]*@")
_QUERY_PAIR = re.compile(r"(?P<name>[^&=?#]+)=(?P<value>[^&#]*)")


def looks_secret(name: str) -> bool:
    """Whether a query parameter named ``name`` carries a credential."""
    plain = name.lower().replace("-", "").replace("_", "")
    return any(word in plain for word in _SECRET_WORDS) or plain == "key"


def mask_url(url: str) -> str:
    """``url`` with its password and its secret-looking query values replaced by ``***``: the
    only form of a URL to log or put in an error."""
    if "://" not in url:  # not a URL at all ("user:secret@host"): mask what looks like one
        return _BARE_USERINFO.sub(lambda m: f"{m['user']}:{MASK}@", url)
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
        parts.port  # noqa: B018 - a port that is not a number raises here: mask by pattern
    except ValueError:
        return _mask_by_pattern(url)
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{MASK}@{host}"
    query = "&".join(_mask_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    # rebuilt by hand: urlunsplit drops the "//" of an empty host (sqlite:///path)
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    return out + (f"#{parts.fragment}" if parts.fragment else "")


def _mask_pair(pair: str) -> str:
    name, eq, _ = pair.partition("=")
    return f"{name}={MASK}" if eq and looks_secret(urllib.parse.unquote(name)) else pair


def _mask_by_pattern(url: str) -> str:
    url = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)
    return _QUERY_PAIR.sub(
        lambda m: f"{m['name']}={MASK}" if looks_secret(m["name"]) else m[0], url
    )


def scrub(url: str, text: str) -> str:
    """``text`` (what a library or a child process said about a connection to ``url``) with
    ``url`` masked wherever it appears whole, and its password, as written in the URL or
    decoded, replaced by ``***`` anywhere else."""
    text = text.replace(url, mask_url(url))
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:  # a malformed URL: its whole form is masked above
        return text
    for secret in {password, urllib.parse.unquote(password)} if password else ():
        text = text.replace(secret, MASK)
    return text
