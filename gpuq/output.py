"""What every gpuq command prints: tables, JSON, one-line errors, exit codes, progress bars.

Shared by gpuq/cli.py (the entry point) and the commands below it (manager/cli.py, manager/demo.py), which
must not import the entry point.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

# Exit codes, the same in every command (the README's table lists them).
OK = 0  # done
FAILED = 1  # the job or goal did not succeed (a job failed, a wait ran out, nothing to cancel)
USAGE = 2  # bad usage, input or configuration: the message names what to change
UNREACHABLE = 3  # cannot reach what it needs: the database, a backend's packages
INTERRUPTED = 130  # Ctrl-C


class CommandError(Exception):
    """A command's failure in the user's words: the entry point prints `gpuq: MESSAGE` on one line and
    exits with `code`."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


def one_line(text: object) -> str:
    """The first line of an error's text (drivers add context lines a user does not need)."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


# Terminal control characters (C0, DEL, C1) and the bidirectional overrides that reorder what is shown:
# stored text (a worker's error or progress message) must not move the cursor, retitle the terminal or
# hide what follows when printed. They are shown escaped instead.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """`text` fit for a terminal: each control character shown as its escape (\\x1b, \\n, \\u202e)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, timedelta):
        return f"{value.total_seconds():.3f}s"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=_json_value)
    return clean(str(value))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    if not rows:
        print("(none)")
        return
    columns = list(columns or rows[0].keys())
    cells = [[fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _json_value(value: object) -> object:
    """What json cannot write by itself, as the database's values come: times as ISO 8601, durations
    as seconds, numerics as numbers."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def print_json(value: object) -> None:
    """`value` as indented JSON on stdout, for scripts (`--json`)."""
    print(json.dumps(value, indent=2, default=_json_value))


# --- progress ------------------------------------------------------------------------------------


def is_terminal() -> bool:
    """Whether stdout is a person's terminal: progress bars only then, plain lines for pipes and logs."""
    return sys.stdout.isatty()


@dataclass
class Bar:
    """One progress bar (rich): elapsed time and ETA, redrawn in place; a no-op off a terminal."""

    _progress: Any = None
    _task: Any = None

    def update(self, completed: float | None = None, description: str | None = None) -> None:
        if self._progress is None:
            return
        fields: dict[str, Any] = {}
        if completed is not None:
            fields["completed"] = completed
        if description is not None:
            fields["description"] = clean(description)
        self._progress.update(self._task, **fields)

    def print(self, line: str) -> None:
        """A line above the bar (or a plain line when there is no bar)."""
        if self._progress is None:
            print(line, flush=True)
        else:
            self._progress.console.print(line, markup=False, highlight=False)


@contextmanager
def progress_bar(description: str, total: float) -> Iterator[Bar]:
    """A bar from 0 to `total` with elapsed time and ETA while the block runs, when stdout is a terminal."""
    if not is_terminal():
        yield Bar()
        return
    from rich.progress import (  # imported here: only a terminal needs it
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        yield Bar(progress, progress.add_task(clean(description), total=total))
