"""Where the agent keeps its files: the work directory and the workers' socket."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from oobleck.agent.config import MAX_UNIX_SOCKET_PATH

SOCKET_NAME = "agent.sock"


@dataclass
class WorkDir:
    """``work_dir`` (the configured one, or a fresh private temporary one) and the socket path
    (in it, or in a short temporary directory when the path would be too long for a socket)."""

    path: Path
    socket_path: Path
    owned: list[Path] = field(default_factory=list)  # removed by :meth:`clean_up`

    @classmethod
    def prepare(cls, configured: str) -> WorkDir:
        owned = []
        if configured:
            path = Path(configured).resolve()
            path.mkdir(parents=True, exist_ok=True)
        else:
            path = Path(tempfile.mkdtemp(prefix="oobleck-agent-"))
            owned.append(path)
        socket_path = path / SOCKET_NAME
        if len(str(socket_path)) > MAX_UNIX_SOCKET_PATH:
            short = Path(tempfile.mkdtemp(prefix="oobleck-agent-sock-"))
            owned.append(short)
            socket_path = short / SOCKET_NAME
        socket_path.unlink(missing_ok=True)
        return cls(path, socket_path, owned)

    def clean_up(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        for path in self.owned:
            shutil.rmtree(path, ignore_errors=True)
