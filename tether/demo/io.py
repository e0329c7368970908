"""Small atomic JSON / JSON-lines helpers shared by the demo's stages and its report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tether.atomic import atomic_write_text


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2) + "\n")
