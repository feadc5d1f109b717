"""gpuq.db.redact: no password survives into a log line, whatever form the connection string takes."""

from __future__ import annotations

import pytest

from gpuq.db import redact


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgres://app:p@ss@w0rd@db/app", "postgres://app:***@db/app"),  # an unencoded "@"
        ("postgresql://app:a%2Fb@db/app?sslmode=require", "postgresql://app:***@db/app?sslmode=require"),
        (
            "postgresql://db/app?user=app&password=s3cret&sslmode=require",
            "postgresql://db/app?user=app&password=***&sslmode=require",
        ),
        ("host=db user=app password=s3cret dbname=app", "host=db user=app password=*** dbname=app"),
        ("host=db password = s3cret", "host=db password = ***"),
        ("host=db password='s3 cr\\'et' dbname=app", "host=db password=*** dbname=app"),
        ("host=db sslpassword=k3y sslkey=/k", "host=db sslpassword=*** sslkey=/k"),
        ("PGPASSWORD=s3cret psql", "PGPASSWORD=*** psql"),
        ("cannot connect to host=db PASSWORD=s3cret", "cannot connect to host=db PASSWORD=***"),
    ],
)
def test_passwords_are_masked_in_every_form(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert "s3" not in redact(text) and "k3y" not in redact(text) and "w0rd" not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://app@db:5432/app",
        "postgresql://db:5432/app?sslmode=require",
        "host=db user=app dbname=app",
        "s3://bucket/prefix",
    ],
)
def test_text_without_a_password_is_left_as_it_is(text: str) -> None:
    assert redact(text) == text
