"""The docs' generated tables: docs/parameters.md's from the step configs (each stage's config.py),
and docs/serving.md's conformance table from the front door's fields (phi3flow/serving/front_door.py).

Each entry point's table sits between `<!-- parameters: <entry point> -->` and
`<!-- end parameters -->`, the conformance table between `<!-- conformance -->` and
`<!-- end conformance -->`; everything else in the pages is written by hand. The code is the one
source of names, defaults and meanings: `tests/unit/test_parameter_docs.py` fails when a page
differs from it, and this refreshes both:

    python -m tests.parameter_docs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from phi3flow.core import config
from phi3flow.pipeline.config import STEP_CONFIGS
from phi3flow.serving import front_door

PAGE = Path(__file__).resolve().parents[1] / "docs" / "parameters.md"
SERVING = PAGE.with_name("serving.md")
CONFORMANCE = re.compile(r"(<!-- conformance -->\n)(.*?)(<!-- end conformance -->)", re.S)
COMMAND = "python -m tests.parameter_docs"
BLOCK = re.compile(r"(<!-- parameters: (\w+) -->\n)(.*?)(<!-- end parameters -->)", re.S)
CONFIGS = STEP_CONFIGS


def table(entry_point: str) -> str:
    rows = ["| parameter | type | default | meaning |", "|---|---|---|---|"]
    fields = config.cli_fields(CONFIGS[entry_point])
    # Inputs (run IDs) first: they are what a step is run on.
    for f in sorted(fields, key=lambda f: "upstream" not in f.metadata):
        kind = {"int": "int", "float": "float", "bool": "bool"}.get(str(f.type), "string")
        if "upstream" in f.metadata:
            default = "(required)"
        elif f.default == "":
            default = "empty"
        else:
            default = f"`{config._to_param(f.default)}`"
        meaning = f.metadata["help"].replace("|", "\\|").replace("<", "&lt;")
        rows.append(f"| `{f.name}` | {kind} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """The page with every generated table brought up to date."""
    found = [m.group(2) for m in BLOCK.finditer(text)]
    if sorted(found) != sorted(CONFIGS):
        raise ValueError(f"{PAGE} has parameter tables for {found}, not for {sorted(CONFIGS)}")
    return BLOCK.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)


def conformance() -> str:
    rows = ["| field | here | notes |", "|---|---|---|"]
    return "\n".join(rows + [field.row() for field in front_door.FIELDS]) + "\n"


def render_serving(text: str) -> str:
    """docs/serving.md with its conformance table brought up to date."""
    if not CONFORMANCE.search(text):
        raise ValueError(f"{SERVING} has no <!-- conformance --> block")
    return CONFORMANCE.sub(lambda m: m.group(1) + conformance() + m.group(3), text)


def main() -> None:
    PAGE.write_text(render(PAGE.read_text()))
    SERVING.write_text(render_serving(SERVING.read_text()))
    print(f"wrote {PAGE}, {SERVING}")


if __name__ == "__main__":
    main()
    sys.exit(0)
