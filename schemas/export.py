"""Export every wire message as JSON Schema: `python -m kvmesh.schemas.export [--check]`.

The exported file (schemas/kvmesh.schema.json) documents the wire for other languages and tools;
`--check` (and the test suite) fails when it is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec

from kvmesh.schemas import kv_events, messages, transfer

OUT = Path(__file__).resolve().parent / "kvmesh.schema.json"
TYPES = (*messages.ALL_MESSAGES, *transfer.ALL_TRANSFER_MESSAGES, kv_events.KVEventBatch)


def render() -> str:
    _, components = msgspec.json.schema_components(TYPES, ref_template="#/$defs/{name}")
    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kvmesh wire messages",
        "description": "msgpack-encoded on NATS; field names as here. messages.py is the source of truth.",
        "x-schema-version": messages.SCHEMA_VERSION,
        "$defs": components,
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the exported file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python -m kvmesh.schemas.export", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
