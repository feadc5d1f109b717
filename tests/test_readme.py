"""The README's SQL, run as written against a freshly migrated database: the examples stay true."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuq.db import connect
from gpuq.migrate import migrate
from tests.conftest import create_database, drop_database, make_settings

README = Path(__file__).resolve().parent.parent / "README.md"
SQL_BLOCKS = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def readme_db() -> Iterator[str]:
    url = create_database("gpuq_readme")
    with connect(url, make_settings(url)) as conn:
        migrate(conn)
        # The examples read job 42: make it exist, finished, with a little history.
        conn.execute(
            "insert into gpuq.jobs (id, queue, payload) overriding system value values (42, 'tts', '{}')"
        )
        conn.execute("select gpuq.cancel_job(42)")
        conn.commit()
    yield url
    drop_database(url)


def test_the_readme_has_sql_examples() -> None:
    assert len(SQL_BLOCKS) >= 2
    assert any("insert into gpuq.jobs" in b for b in SQL_BLOCKS)
    assert any("gpuq.queue_stats()" in b for b in SQL_BLOCKS)


@pytest.mark.parametrize("block", SQL_BLOCKS, ids=lambda b: b.split("\n", 1)[0][:40])
def test_readme_sql_runs_as_written(readme_db: str, block: str) -> None:
    with connect(readme_db, make_settings(readme_db)) as conn:
        if "insert into gpuq.jobs" in block:
            conn.execute("set local role gpuq_app")  # what apps run, with the grants apps get
        for statement in (s.strip() for s in _statements(block)):
            conn.execute(statement)  # raises on any error: a wrong name, argument, type or grant
        conn.rollback()


def _statements(block: str) -> list[str]:
    """Split on semicolons that end a line; drop comment-only pieces."""
    code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
    return [s for s in re.split(r";\s*(?:--[^\n]*)?\n", code + "\n") if s.strip()]
