"""A constitution: named principles, each with a critique request, a revision request and the comparison
question a judge answers about two responses.

    name: my-constitution          # optional
    principles:
      - name: helpfulness
        critique: "Identify the ways in which the response fails to help ..."
        revision: "Rewrite the response so that ..."
        comparison: "Which response is more helpful ...?"

Loading validates the whole file: a missing field, an unknown key, an empty or duplicate name stops with
one line that names the file, the principle and the problem (ConstitutionError, a ConfigError, so every
tether command prints it as one line and exits 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tether.config import ConfigError

DEFAULT = Path(__file__).with_name("default_constitution.yaml")
FIELDS = ("name", "critique", "revision", "comparison")
TOP = ("name", "description", "principles")


class ConstitutionError(ConfigError):
    """A constitution file is malformed. The message names the file and the principle."""


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    comparison: str


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    path: str

    def get(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        raise ConstitutionError(f"{self.path}: no principle named {name!r} (it has: {', '.join(p.name for p in self.principles)})")


def load_constitution(path: str | Path | None = None) -> Constitution:
    """The constitution in `path` (YAML), or tether's default set (helpfulness, harmlessness, honesty)."""
    path = Path(path) if path else DEFAULT

    def fail(msg: str):
        raise ConstitutionError(f"{path}: {msg}")

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail("no such file")
    except yaml.YAMLError as e:
        fail(f"not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(doc, dict):
        fail("must be a mapping with a 'principles' list")
    unknown = sorted(set(doc) - set(TOP))
    if unknown:
        fail(f"unknown top-level key {unknown[0]!r} (expected: {', '.join(TOP)})")
    items = doc.get("principles")
    if not isinstance(items, list) or not items:
        fail("'principles' must be a non-empty list")
    out, seen = [], set()
    for i, item in enumerate(items, 1):
        where = f"principle #{i}"
        if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"].strip():
            where = f"principle {item['name']!r} (#{i})"
        if not isinstance(item, dict):
            fail(f"{where}: must be a mapping with {', '.join(FIELDS)}")
        unknown = sorted(set(map(str, item)) - set(FIELDS))
        if unknown:
            fail(f"{where}: unknown key {unknown[0]!r} (expected: {', '.join(FIELDS)})")
        for k in FIELDS:
            if k not in item or item[k] is None:
                fail(f"{where}: missing field {k!r}")
            if not isinstance(item[k], str) or not item[k].strip():
                fail(f"{where}: field {k!r} must be a non-empty string")
        if item["name"] in seen:
            fail(f"{where}: duplicate name {item['name']!r}")
        seen.add(item["name"])
        out.append(Principle(**{k: item[k].strip() for k in FIELDS}))
    name = doc.get("name") or path.stem
    return Constitution(str(name), tuple(out), str(path))
