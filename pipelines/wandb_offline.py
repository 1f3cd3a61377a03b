"""Read a W&B offline run file (`run-<id>.wandb`) back: config, history rows and summary.

wandb >= 0.20 ships no reader; the file is LevelDB-log framed (7-byte header `:W&B`, 0xBEE1,
version; 32 KiB blocks; records with a `<IHB` crc/length/type header, FULL/FIRST/MIDDLE/LAST)
around `wandb_internal_pb2.Record` protobufs."""
from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK, _HDR = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    pos, buf = 7, b""
    while pos + _HDR <= len(data):
        left = _BLOCK - (pos % _BLOCK)
        if left < _HDR:
            pos += left
            continue
        _, length, rtype = struct.unpack("<IHB", data[pos:pos + _HDR])
        if length == 0 and rtype == 0:
            pos += left
            continue
        payload = data[pos + _HDR: pos + _HDR + length]
        pos += _HDR + length
        if rtype in (_FIRST, _MIDDLE):
            buf = payload if rtype == _FIRST else buf + payload
            continue
        buf = payload if rtype == _FULL else buf + payload
        rec = pb.Record()
        rec.ParseFromString(buf)
        buf = b""
        yield rec


def read_run(path: str | Path) -> dict:
    """-> {"config", "history", "summary", "run": {group, job_type, name, tags}, "exit_code"}."""
    out = {"config": {}, "history": [], "summary": {}, "run": {}, "exit_code": None}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in r.history.item})
        elif kind == "summary":
            for i in r.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "config":
            for i in r.config.update:
                out["config"][i.key] = json.loads(i.value_json)
        elif kind == "run":
            out["run"] = {"group": r.run.run_group, "job_type": r.run.job_type,
                          "name": r.run.display_name, "tags": list(r.run.tags)}
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def find_runs(root: str | Path) -> list[Path]:
    return sorted(Path(root).rglob("run-*.wandb"))
