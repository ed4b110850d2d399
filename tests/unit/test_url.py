"""One masking function for every URL the product prints: the password of the user info and
every query value whose name looks secret, also in URLs too malformed to parse."""

from __future__ import annotations

import pytest

from fastq.url import looks_secret, mask_url, scrub


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/vh", "amqp://guest:***@127.0.0.1:5672/vh"),
        ("sqlite:///fastq.db", "sqlite:///fastq.db"),
        (
            "sqlite:////abs/q.db?lease=30&password=hunter2",
            "sqlite:////abs/q.db?lease=30&password=***",
        ),
        ("sqlite://user:hunter2@/path", "sqlite://user:***@/path"),
        ("amqp://u:hunter2@h:notaport/x?token=t", "amqp://u:***@h:notaport/x?token=***"),
        ("user:hunter2@host", "user:***@host"),
        (
            "postgresql://a:b%40c@h/db?sslmode=require&sslpassword=x&api_key=1&Token=z",
            "postgresql://a:***@h/db?sslmode=require&sslpassword=***&api_key=***&Token=***",
        ),
        ("amqps://h/?cafile=a.pem&heartbeat=3", "amqps://h/?cafile=a.pem&heartbeat=3"),
        ("memory://x", "memory://x"),
    ],
)
def test_mask_url_hides_passwords_and_secret_looking_query_values(url, masked):
    assert mask_url(url) == masked
    assert "hunter2" not in mask_url(url)


def test_which_query_names_look_secret():
    assert all(map(looks_secret, ["password", "PASSWD", "api-key", "access_key", "secret", "key"]))
    assert not any(map(looks_secret, ["lease", "heartbeat", "cafile", "sslmode", "keepalive"]))


def test_scrub_removes_the_password_as_written_and_decoded() -> None:
    url = "amqp://guest:s3cret-pw%21@127.0.0.1:5672/"
    text = "connect to amqp://guest:s3cret-pw%21@127.0.0.1:5672/ failed; password s3cret-pw!"
    assert scrub(url, text) == ("connect to amqp://guest:***@127.0.0.1:5672/ failed; password ***")
    assert scrub("amqp://127.0.0.1:5672/", "no password here") == "no password here"
