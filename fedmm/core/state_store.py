"""Per-client state on disk, keyed by a stable client id: personal models and small metadata.

Flower keeps every virtual node's `Context.state` in the simulation process and ships it to the
actors with each message, so personal models live here instead: one folder per client, tensors in
`safetensors`, metadata in JSON, each written atomically (a crash never leaves half a file).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
DEFAULT_FOLDER = "client_state"  # under the run's results folder when personal.state_dir is empty


class ClientStateStore:
    def __init__(self, root: str | Path, client_id: str) -> None:
        if not _SAFE_NAME.match(client_id) or client_id in (".", ".."):
            raise ValueError(f"client id {client_id!r} must be letters, digits, '_', '-' or '.'")
        self.folder = Path(root) / client_id

    def _path(self, name: str, suffix: str) -> Path:
        if not _SAFE_NAME.match(name):
            raise ValueError(f"state name {name!r} must be letters, digits, '_', '-' or '.'")
        return self.folder / f"{name}{suffix}"

    def _atomic_write(self, path: Path, write) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, path)

    def has_tensors(self, name: str) -> bool:
        return self._path(name, ".safetensors").is_file()

    def load_tensors(self, name: str) -> dict[str, np.ndarray] | None:
        path = self._path(name, ".safetensors")
        return load_file(str(path)) if path.is_file() else None

    def save_tensors(self, name: str, tensors: dict[str, np.ndarray]) -> None:
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        self._atomic_write(self._path(name, ".safetensors"), lambda p: save_file(arrays, str(p)))

    def load_meta(self, name: str = "meta") -> dict[str, Any]:
        path = self._path(name, ".json")
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_meta(self, meta: dict[str, Any], name: str = "meta") -> None:
        text = json.dumps(meta, sort_keys=True)
        self._atomic_write(self._path(name, ".json"), lambda p: p.write_text(text))
