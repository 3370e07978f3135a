"""Regenerate the key reference in config/README.md from config/schema.yaml.

Usage: python scripts/config_doc.py [--check]. With --check, exit 1 if the README is stale
(the test suite runs this, so the documentation cannot drift from the schema).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "config" / "schema.yaml"
README = ROOT / "config" / "README.md"
BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"


def _type(sub: dict) -> str:
    if "enum" in sub:
        return " \\| ".join(f"`{v}`" for v in sub["enum"])
    t = sub.get("type", "object")
    return " or ".join(t) if isinstance(t, list) else t


def _rows(schema: dict, props: dict, prefix: str, defs: dict):
    for name, sub in props.items():
        if "$ref" in sub:
            sub = defs[sub["$ref"].split("/")[-1]]
        key = f"{prefix}{name}"
        default = (
            f"`{json.dumps(sub['default'])}`"
            if "default" in sub and sub.get("type") != "object"
            else ""
        )
        desc = " ".join(str(sub.get("description", "")).split())
        yield f"| `{key}` | {_type(sub)} | {default} | {desc} |"
        if "properties" in sub:
            yield from _rows(schema, sub["properties"], f"{key}.", defs)
        extra = sub.get("additionalProperties")
        if isinstance(extra, dict):
            if "$ref" in extra:
                extra = defs[extra["$ref"].split("/")[-1]]
            if "properties" in extra:
                yield from _rows(schema, extra["properties"], f"{key}.<name>.", defs)


def render() -> str:
    schema = yaml.safe_load(SCHEMA.read_text())
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += list(_rows(schema, schema["properties"], "", schema.get("$defs", {})))
    return "\n".join(lines)


def main() -> int:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}\n{END}{tail}"
    if "--check" in sys.argv:
        if new != text:
            print(
                f"{README}: stale key reference; run python scripts/config_doc.py", file=sys.stderr
            )
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
