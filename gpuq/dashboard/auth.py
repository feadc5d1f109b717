"""Who may look at the dashboard and who may act on it.

Users live in a file (GPUQ_DASHBOARD_USERS), one per line, `NAME:ROLE:HASH`: ROLE is `viewer` (reads only) or
`operator` (reads and uses the controls), HASH a salted scrypt hash of the password. Make a line with

    python -m gpuq.dashboard.auth NAME ROLE     (asks for the password; prints the line)

The browser logs in with HTTP Basic authentication, so off the loopback interface serve the page over TLS
(GPUQ_DASHBOARD_TLS_CERT/KEY, or a reverse proxy): Basic sends the password with every request.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

ROLES = ("viewer", "operator")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # what the audit records as the actor
# scrypt at n=2^14, r=8, p=1: 16 MiB and tens of milliseconds per check (verified logins are cached).
SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class UsersError(ValueError):
    """A malformed users file; the message names the line."""


@dataclass(frozen=True)
class User:
    name: str
    role: str  # viewer | operator

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


# Without a users file the page is served on loopback only, to whoever can reach it there.
LOCAL_OPERATOR = User("local", "operator")


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    try:
        kind, n, r, p, salt, digest = hashed.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt, validate=True),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
            maxmem=2**26,
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, want)


@dataclass(frozen=True)
class Account:
    user: User
    hashed: str


def parse_users(text: str, where: str = "GPUQ_DASHBOARD_USERS") -> dict[str, Account]:
    """NAME:ROLE:HASH lines (blank lines and # comments skipped) -> accounts by name."""
    accounts: dict[str, Account] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise UsersError(f"{where} line {number}: expected NAME:ROLE:HASH")
        name, role, hashed = parts
        if not NAME.fullmatch(name):
            raise UsersError(f"{where} line {number}: a name is 1-64 of A-Z a-z 0-9 _ . @ - (got {name!r})")
        if role not in ROLES:
            raise UsersError(f"{where} line {number}: the role must be viewer or operator (got {role!r})")
        if not hashed.startswith("scrypt$") or hashed.count("$") != 5:
            raise UsersError(
                f"{where} line {number}: the hash must be one `python -m gpuq.dashboard.auth` printed"
            )
        if name in accounts:
            raise UsersError(f"{where} line {number}: {name} is listed twice")
        accounts[name] = Account(User(name, role), hashed)
    if not accounts:
        raise UsersError(f"{where} lists no user")
    return accounts


def load_users(path: Path) -> dict[str, Account]:
    try:
        text = path.read_text()
    except OSError as e:
        raise UsersError(f"cannot read GPUQ_DASHBOARD_USERS {path}: {e.strerror}") from None
    return parse_users(text, f"GPUQ_DASHBOARD_USERS {path}")


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(name, password) from an `Authorization: Basic …` header; None when absent or malformed."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        name, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (name, password) if sep else None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ROLES or not NAME.fullmatch(argv[0]):
        print("usage: python -m gpuq.dashboard.auth NAME viewer|operator   (prints a users-file line)")
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {argv[0]}: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 12:
        print("use at least 12 characters", file=sys.stderr)
        return 1
    print(f"{argv[0]}:{argv[1]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
