"""Render the figures of a reliability run (the JSON the suite writes) as the Markdown
table of docs/reliability.md.

    python tests/reliability/render_table.py reliability.json
"""
from __future__ import annotations

import json
import sys

COLUMNS = [("check", "Check"), ("cases", "Cases tried"), ("faults", "Faults injected"), ("load", "Load held"),
           ("errors", "Errors"), ("memory", "Memory (RSS)"), ("lost", "Lost"), ("result", "Result"),
           ("command", "Reproduce")]


def _cell(row: dict, key: str) -> str:
    value = row.get(key, "")
    if value is None or value == "":
        return "-"
    if key == "command":
        return f"`{value}`"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 400 else text[:400] + " ..."


def render(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
