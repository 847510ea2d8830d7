"""Output: tables (rich when installed, else plain text) and the JSON file."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, Sequence, Union

# A column: (header, row key, format string like "{:.2f}" or a callable).
Column = tuple[str, str, Union[str, Callable[[Any], str]]]


def _cell(row: dict, key: str, fmt) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def print_table(title: str, columns: Sequence[Column], rows: Sequence[dict],
                plain: bool = False, file=None) -> None:
    file = file or sys.stdout
    cells = [[_cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
    headers = [c[0] for c in columns]
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if not plain:
        # Title printed apart: rich would wrap it to the table's width.
        console = Console(file=file, width=max(120, len(title)))
        table = Table()
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in cells:
            table.add_row(*row)
        console.print(title, markup=False, highlight=False)
        console.print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(items):
        return "  ".join(s.ljust(w) if i == 0 else s.rjust(w)
                         for i, (s, w) in enumerate(zip(items, widths)))

    print(title, file=file)
    print(line(headers), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print(line(row), file=file)
    print(file=file)


def _finite(obj: Any, path: str = "$") -> None:
    """JSON readers choke on NaN/Inf; a non-finite number is a benchmark bug."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number at {path}: {obj}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{path}[{i}]")


def write_json(path: str, data: dict) -> None:
    _finite(data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")
