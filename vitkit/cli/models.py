"""`vitkit models [PATTERN]`: registered variants with family, input size, parameters and GFLOPs.

GFLOPs follow the papers: multiply-accumulates of one image's forward pass at the native resolution, attention
products included (``vitkit.bench.flops``). They are read from the per-family files in ``vitkit/models/stats`` (no
model is built, torch is not imported) while those are current; a variant added or changed since is counted on the
meta device, with progress on stderr (``python -m vitkit.bench.flops --update`` saves the counts).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys

HELP = "list registered models with parameters (M) and GFLOPs (MACs, as the papers count them)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter, case-insensitive, e.g. 'deit*' "
                                                                 "(default: all)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")


def rows(pattern: str = "*") -> list[dict]:
    import fnmatch

    from vitkit.models.stats import fresh, read_all
    files = read_all()
    if fresh(files):  # every family file is as its stats were computed: the files are the registry's numbers
        table = sorted((_row(name, data["family"], entry) for data in files.values()
                        for name, entry in data["variants"].items() if fnmatch.fnmatchcase(name, pattern.lower())),
                       key=lambda r: r["name"])
    else:
        import vitkit
        from vitkit.bench.flops import stats_rows
        table = stats_rows(vitkit.list_models(pattern))
    if not table:
        raise ValueError(f"no model matches {pattern!r}")
    return table


def _row(name: str, family: str, entry: dict) -> dict:
    """The row ``vitkit.bench.flops.ModelStats.as_dict`` gives, from a stats-file entry (without importing torch)."""
    return {"name": name, "family": family, "input_size": list(entry["input_size"]), "params": entry["params"],
            "macs": entry["macs"], "params_m": round(entry["params"] / 1e6, 3), "gflops": round(entry["macs"] / 1e9, 3)}


def _size(row: dict) -> str:
    c, h, w = row["input_size"]
    return f"{h}x{w}"


def format_table(table: list[dict]) -> str:
    header = ("model", "family", "input", "params (M)", "GFLOPs")
    body = [(r["name"], r["family"], _size(r), f"{r['params_m']:.2f}", f"{r['gflops']:.2f}") for r in table]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    align = ("<", "<", "<", ">", ">")
    lines = ["  ".join(f"{v:{a}{w}}" for v, a, w in zip(line, align, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    table = rows(args.pattern)
    if args.format == "json":
        json.dump(table, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(("name", "family", "input", "params_m", "gflops"))
        writer.writerows((r["name"], r["family"], _size(r), r["params_m"], r["gflops"]) for r in table)
    else:
        print(format_table(table))
    return 0
