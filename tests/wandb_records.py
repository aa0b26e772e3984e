"""Read back a W&B offline run file (`run-*.wandb`): a LevelDB-style log of protobuf Records."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B datastore"
    records, chunks, pos = [], [], 7
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += room
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        chunks.append(payload)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def run_info(path: Path) -> dict:
    """{"group", "tags", "config": {...}, "history": [{key: value}], "summary": {key: value}}."""
    out: dict = {"group": None, "tags": [], "config": {}, "history": [], "summary": {}}

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["tags"] = record.run.run_group, list(record.run.tags)
            out["config"].update({key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
    return out
