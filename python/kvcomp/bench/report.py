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


# ------------------------------------------------------------ the bar
# (what, row filter, value key, target) per format; see bench/NOTES.md.
DECODE_SPEEDUP_BAR = {"fp8_e4m3": 1.8, "fp8_e5m2": 1.8, "int8": 1.8, "int4": 3.0, "int2": 5.0}
DECODE_COPY_BW_BAR = 0.80
TOPK_SPEEDUP_BAR = 3.0
WRITE_COPY_BW_BAR = 0.70


def _worst(rows: Sequence[dict], key: str) -> tuple[Any, dict | None]:
    rows = [r for r in rows if isinstance(r.get(key), (int, float))]
    if not rows:
        return None, None
    worst = min(rows, key=lambda r: r[key])
    return worst[key], worst


def _check(name: str, rows: Sequence[dict], key: str, target: float, where) -> dict:
    value, row = _worst(rows, key)
    return {"check": name, "target": target, "worst": value, "at": where(row) if row else "no rows",
            "status": "n/a" if value is None else ("PASS" if value >= target else "FAIL")}


def bar_checks(result: dict) -> list[dict]:
    """The issue's bar, evaluated on an ``ops`` JSON (``--sweep`` on CUDA):
    the worst value of each criterion over the rows it covers."""
    def at(r):
        return f"batch {r['batch']} ctx {r['context']}"
    decode = [r for r in result.get("decode", []) if r["batch"] >= 16 and r["context"] >= 8192]
    checks = []
    for fmt in sorted({r["format"] for r in decode}):
        rows = [r for r in decode if r["format"] == fmt]
        checks.append(_check(f"decode {fmt}: frac of copy BW", rows, "frac_of_copy_bw", DECODE_COPY_BW_BAR, at))
        if fmt in DECODE_SPEEDUP_BAR:
            checks.append(_check(f"decode {fmt}: x sdpa fp16", rows, "speedup_vs_sdpa_fp16",
                                 DECODE_SPEEDUP_BAR[fmt], at))
    topk = [r for r in result.get("topk", []) if r["k"] == 1024 and 32768 <= r["context"] <= 131072]
    checks.append(_check("topk k=1024: x torch.topk", topk, "speedup_vs_torch_topk", TOPK_SPEEDUP_BAR,
                         lambda r: f"batch {r['batch']} ctx {r['context']}"))
    writes = [r for r in result.get("quantize_write", []) if r["op"] == "quantize_write" and r["tokens"] >= 65536]
    checks.append(_check("quantize_write >= 64k tokens: frac of copy BW", writes, "frac_of_copy_bw",
                         WRITE_COPY_BW_BAR, lambda r: r["format"]))
    return checks


def print_bar(result: dict, plain: bool = False, file=None) -> bool:
    """Prints the bar table; True if nothing failed."""
    checks = bar_checks(result)
    title = (f"the issue's bar on {result.get('device')} (commit {str(result.get('commit'))[:12]}, "
             f"copy {result.get('copy_bandwidth_gbps', 0):.0f} GB/s); decode rows: batch >= 16, context >= 8k")
    print_table(title, [("check", "check", "{}"), ("target", "target", "{:g}"),
                        ("worst", "worst", "{:.3g}"), ("at", "at", "{}"), ("", "status", "{}")],
                checks, plain, file)
    for s in result.get("skipped", []):
        print(f"skipped: batch {s['batch']} x context {s['context']}: {s['reason']}", file=file or sys.stdout)
    return all(c["status"] != "FAIL" for c in checks)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvcomp.bench.report RESULT.json [--plain]``: the bar table.
    Exit code 0 (all met or not measured), 1 (some criterion failed)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m kvcomp.bench.report", description=main.__doc__)
    p.add_argument("json", help="a kvcomp-bench ops --json file")
    p.add_argument("--plain", action="store_true")
    args = p.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    return 0 if print_bar(result, args.plain) else 1


if __name__ == "__main__":
    sys.exit(main())
