"""Who this worker is: the instance its secret belongs to.

The manager starts a rented machine with a secret of its own (GPUQ_INSTANCE_SECRET); `gpuq enroll` gives
one to a worker started by hand. At registration the worker replaces that secret with one it makes itself
(only the hash travels), so the secret in the machine's environment or EC2 user data is dead once the
worker runs. The new secret is kept on disk (mode 0600), so a worker restarted on the same machine is
still that instance. The file lists candidates, newest first: a secret is written before the call that
installs it and removed only once the database has refused it, so a crash or a lost reply at any point
leaves one that works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("gpuq.worker")


class SecretStore:
    """The rotated secrets of one instance, in state_dir, keyed by the secret the machine started with."""

    def __init__(self, state_dir: Path, boot_secret: str) -> None:
        self.boot_secret = boot_secret
        key = hashlib.sha256(boot_secret.encode()).hexdigest()[:16]
        self.path = state_dir / f"instance-{key}.json"

    def candidates(self) -> list[str]:
        """Secrets to try, newest first; the boot secret last."""
        return [*(s for s in self.stored() if s != self.boot_secret), self.boot_secret]

    def save(self, secrets: list[str]) -> None:
        """Replace the stored list (atomically; readable by this user only)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(list(dict.fromkeys(secrets)), f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def stored(self) -> list[str]:
        """The rotated secrets on disk, newest first."""
        try:
            value = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s); starting from the machine's own secret", self.path, exc)
            return []
        return [s for s in value if isinstance(s, str)] if isinstance(value, list) else []
