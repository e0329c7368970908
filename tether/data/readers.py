"""Readers: yield (loc, record, error) from .jsonl, .json, their .gz versions, .txt and HF datasets on disk.

A spec is one path or several joined by ','. A record that cannot be read (invalid JSON, not UTF-8,
not an object) is yielded with its error so that the caller can apply data.on_bad_record; a file that
cannot be read at all raises DataError at once.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import Any

from tether.data.records import BadRecord, DataError

Item = tuple[str, Any, BadRecord | None]  # (loc, record or None, error or None)

JSONL = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
JSON = (".json", ".json.gz")


def split_spec(spec: str) -> list[str]:
    paths = [p.strip() for p in (spec or "").split(",") if p.strip()]
    if not paths:
        raise DataError("no data file given (set data.train)")
    return paths


def iter_records(spec: str, allow_txt: bool = False) -> Iterator[Item]:
    for path in split_spec(spec):
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or directory")
        low = path.lower()
        if os.path.isdir(path):
            yield from _read_hf(path)
        elif low.endswith(JSONL):
            yield from _read_jsonl(path)
        elif low.endswith(JSON):
            yield from _read_json(path)
        elif low.endswith((".txt", ".txt.gz")) and allow_txt:
            yield from _read_txt(path)
        else:
            kinds = ".jsonl, .json, .jsonl.gz, .json.gz" + (", .txt" if allow_txt else "")
            raise DataError(f"{path}: unsupported file type (expected {kinds} or a dataset folder saved with datasets.save_to_disk)")


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}: {e.reason})") from None


def _parse(text: str) -> Any:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}", "record is not a JSON object")
    return rec


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    try:
        with _open_bytes(path) as f:
            for i, raw in enumerate(f, 1):
                if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                yield i, raw
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read file ({e})") from None


def _read_jsonl(path: str) -> Iterator[Item]:
    for i, raw in _lines(path):
        if not raw.strip():
            continue
        loc = f"{path}:{i}"
        try:
            yield loc, _parse(_decode(raw).rstrip()), None
        except BadRecord as e:
            yield loc, None, e


def _read_txt(path: str) -> Iterator[Item]:
    """One prompt per line; blank lines are not records."""
    for i, raw in _lines(path):
        loc = f"{path}:{i}"
        try:
            line = _decode(raw).rstrip("\r\n")
        except BadRecord as e:
            yield loc, None, e
            continue
        if line.strip():
            yield loc, {"prompt": line}, None


def _read_json(path: str) -> Iterator[Item]:
    data = b"".join(raw for _, raw in _lines(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}: {e.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a JSONL file named .json: read it line by line
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):
        # One record, or {"data"/"examples"/...: [records]} (a single list-valued key).
        lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1 and len(obj) <= 3 and not {"prompt", "messages", "chosen", "responses"} & set(obj):
            obj = obj[lists[0]]
        else:
            yield f"{path}[0]", obj, None
            return
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(obj).__name__}")
    for i, rec in enumerate(obj):
        loc = f"{path}[{i}]"
        if isinstance(rec, dict):
            yield loc, rec, None
        else:
            yield loc, None, BadRecord(f"expected a JSON object, got {type(rec).__name__}", "record is not a JSON object")


def _read_hf(path: str) -> Iterator[Item]:
    try:
        import datasets  # optional dependency, imported only when a dataset folder is given
    except ImportError:
        raise DataError(f"{path}: is a folder, read as a Hugging Face dataset saved to disk, which needs the "
                        f"'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - datasets raises several types for a folder it cannot read
        raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(f"{path}: a DatasetDict with splits {splits} and no 'train'; give the split's folder, e.g. {path}/{splits[0]}")
    for i, rec in enumerate(ds):
        yield f"{path}[{i}]", rec, None
