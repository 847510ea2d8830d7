"""A/B timing of two kvcomp builds in one run: ``kvcomp-bench ops`` alternates
between them (A B A B ...), and each row's median over the rounds is compared.

    python bench/compare_builds.py --a /path/to/old/python --b python \\
        --rounds 3 --json out.json -- --device cpu --context 32768

--a/--b are the directories put first on PYTHONPATH (each holds a built
``kvcomp`` package); everything after ``--`` goes to ``kvcomp-bench ops``.
Alternating rounds spread the machine's drift (other load, thermal state)
over both builds instead of charging it to one.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def row_key(section, row):
    name = row.get("spec") or row.get("name") or ""
    return (section, name, row.get("op", ""), row.get("batch", 1), row.get("context") or row.get("tokens"))


def run_once(root, extra):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    cmd = [sys.executable, "-m", "kvcomp.bench.cli", "ops", "--plain", "--json", path, *extra]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        report = json.load(f)
    os.unlink(path)
    rows = {}
    for section in ("decode", "topk", "quantize_write", "seal_blocks"):
        for row in report.get(section, []):
            rows[row_key(section, row)] = row["ms"]
    return report, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="PYTHONPATH root of build A (the baseline)")
    ap.add_argument("--b", required=True, help="PYTHONPATH root of build B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the comparison here")
    ap.add_argument("ops_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    extra = [a for a in args.ops_args if a != "--"]
    times = {"a": {}, "b": {}}
    meta = {}
    for r in range(args.rounds):
        for side in ("a", "b"):
            report, rows = run_once(getattr(args, side), extra)
            meta[side] = {k: report.get(k) for k in ("commit", "torch", "threads", "read_bandwidth_gbps")}
            for k, ms in rows.items():
                times[side].setdefault(k, []).append(ms)
            print(f"round {r + 1}/{args.rounds} {side}: {len(rows)} rows", file=sys.stderr)
    out = []
    print(f"{'section':15} {'row':28} {'A ms':>9} {'B ms':>9} {'B/A':>6}")
    for k in sorted(times["a"], key=str):
        if k not in times["b"]:
            continue
        a, b = statistics.median(times["a"][k]), statistics.median(times["b"][k])
        out.append({"section": k[0], "row": k[1], "op": k[2], "batch": k[3], "context": k[4],
                    "a_ms": a, "b_ms": b, "ratio": b / a, "a_samples": times["a"][k], "b_samples": times["b"][k]})
        print(f"{k[0]:15} {k[1] + ' ' + str(k[4]):28} {a:9.3f} {b:9.3f} {b / a:6.3f}")
    ratios = [o["ratio"] for o in out]
    geo = statistics.geometric_mean(ratios) if ratios else float("nan")
    print(f"geometric mean B/A over {len(ratios)} rows: {geo:.3f}; worst {max(ratios):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": meta.get("a"), "b": meta.get("b"), "rounds": args.rounds, "ops_args": extra,
                       "geomean_ratio": geo, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
