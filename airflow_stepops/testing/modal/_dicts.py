"""Named Modal Dicts: keys and values are the serialized bytes the client sends, compared as bytes (as the
service stores them); enough for ``Dict.from_name``, ``put`` (also ``skip_if_exists``), ``get`` and ``pop``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from grpclib import GRPCError, Status

from airflow_stepops.testing.modal._ids import lookup, new_id


@dataclass
class Dict:
    id: str
    name: str
    environment: str
    entries: dict[bytes, bytes] = field(default_factory=dict)


class DictStore:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dicts: dict[str, Dict] = {}

    def get_or_create(self, name: str, environment: str, create: bool) -> Dict:
        with self.lock:
            found = next((d for d in self.dicts.values() if d.name == name and d.environment == environment), None)
            if found is not None:
                return found
            if not create:
                raise GRPCError(Status.NOT_FOUND, f"Dict '{name}' not found in environment '{environment}'")
            created = Dict(new_id("di"), name, environment)
            self.dicts[created.id] = created
            return created

    def of(self, dict_id: str) -> Dict:
        return lookup(self.dicts, self.lock, "Dict", dict_id)

    def update(self, dict_id: str, entries: list[tuple[bytes, bytes]], if_not_exists: bool) -> bool:
        """Set the entries; with ``if_not_exists`` nothing is set when any key exists (False)."""
        target = self.of(dict_id)
        with self.lock:
            if if_not_exists and any(key in target.entries for key, _ in entries):
                return False
            target.entries.update(entries)
            return True

    def pop(self, dict_id: str, key: bytes) -> bytes | None:
        target = self.of(dict_id)
        with self.lock:
            return target.entries.pop(key, None)

    def get(self, dict_id: str, key: bytes) -> bytes | None:
        target = self.of(dict_id)
        with self.lock:
            return target.entries.get(key)
