"""The Batch API server's state: a store folder (any fsspec URL), never the server's memory.

```
<store>/
  files/<file_id>.json        the file's record: owner, filename, bytes, purpose, location
  files/<file_id>.jsonl       an uploaded request file (create-only)
  batches/<batch_id>.json     the batch's record (OpenAI's Batch fields + owner, deadline,
                              the job's output path); replaced atomically on every change
  batches/<batch_id>/out/     the batch's batchinfer job output (markers, parts, ledger,
                              openai/output.jsonl and openai/errors.jsonl)
  batches/<batch_id>/files/   output and error files of a batch cut short (cancelled, expired)
```

Output and error files of a batch are file records too (``file-<batch>-output``, ...) whose
bytes live in the job's output. A restarted server reads every batch record and picks up those
that were not finished. One server per store: records are replaced, not merged.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batch import storage

#: Batch statuses after which nothing changes.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: completion_window values accepted (OpenAI accepts "24h" only).
WINDOWS = {"24h": 24 * 3600.0}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Store:
    """A store folder and the filesystem it is on."""

    url: str
    storage_options: Mapping[str, Any]

    def fs(self) -> tuple[Any, str]:
        return storage.open_fs(self.url, self.storage_options)

    def url_of(self, *parts: str) -> str:
        """An fsspec URL under the store, for a job's input or output path."""
        return "/".join([self.url.rstrip("/"), *parts])

    # ------------------------------------------------------------------ files

    def put_file(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        fs, root = self.fs()
        file_id = new_id("file").replace("_", "-", 1)
        name = f"files/{file_id}.jsonl"
        storage.create_only(fs, storage.join(root, name), data)
        record = {"id": file_id, "object": "file", "bytes": len(data),
                  "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                  "status": "processed", "owner": owner, "location": name}  # fmt: skip
        storage.create_only(fs, storage.join(root, f"files/{file_id}.json"), _dump(record))
        return record

    def add_file_record(self, record: Mapping[str, Any]) -> None:
        """A record for a file the server made (a batch's output or error file)."""
        fs, root = self.fs()
        storage.overwrite(fs, storage.join(root, f"files/{record['id']}.json"), _dump(record))

    def file(self, file_id: str) -> dict[str, Any] | None:
        if not _safe(file_id):
            return None
        fs, root = self.fs()
        doc = storage.read_json_or_none(fs, storage.join(root, f"files/{file_id}.json"))
        return doc if isinstance(doc, dict) else None

    def file_bytes(self, record: Mapping[str, Any]) -> bytes:
        fs, root = self.fs()
        with fs.open(storage.join(root, str(record["location"])), "rb") as fh:
            data: bytes = fh.read()
        return data

    # ------------------------------------------------------------------ batches

    def save_batch(self, record: Mapping[str, Any]) -> None:
        fs, root = self.fs()
        storage.overwrite(fs, storage.join(root, f"batches/{record['id']}.json"), _dump(record))

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        if not _safe(batch_id):
            return None
        fs, root = self.fs()
        doc = storage.read_json_or_none(fs, storage.join(root, f"batches/{batch_id}.json"))
        return doc if isinstance(doc, dict) else None

    def batches(self) -> list[dict[str, Any]]:
        """Every batch record, newest first."""
        fs, root = self.fs()
        out = []
        for path in storage.list_files(fs, storage.join(root, "batches"), ".json"):
            doc = storage.read_json_or_none(fs, path)
            if isinstance(doc, dict):
                out.append(doc)
        out.sort(key=lambda d: (d.get("created_at", 0), d.get("id", "")), reverse=True)
        return out

    def write(self, name: str, data: bytes) -> None:
        fs, root = self.fs()
        storage.overwrite(fs, storage.join(root, name), data)


def _safe(ident: str) -> bool:
    return bool(ident) and all(c.isalnum() or c in "-_" for c in ident)


def _dump(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode()
