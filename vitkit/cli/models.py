"""`vitkit models [PATTERN]`: registered variants with family, input size, parameters and GFLOPs.

GFLOPs follow the papers: multiply-accumulates of one image's forward pass at the native resolution, attention
products included (``vitkit.bench.flops``). They are read from the per-family files ``vitkit/families/<family>/stats.json`` (no
model is built, torch is not imported) while those are current; a variant added or changed since is counted on the
meta device, with progress on stderr (``python -m vitkit.bench.flops --update`` saves the counts).

`vitkit models --pretrained [PATTERN]`: the variants with named weights (what ``pretrained=True`` and ``--pretrained
true`` load): the checkpoint format, how the download is verified and where it comes from (a URL or a Hugging Face Hub
repository); then the variants whose authors published weights with no stable download, and where those are. It reads
the catalogs through the registry (torch is imported; the plain listing stays torch-free).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys

TORCH_FREE = True  # the listing reads the stats file; the CLI does not import torch before running it (cli/main.py)

HELP = "list registered models with parameters (M) and GFLOPs (MACs, as the papers count them)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter, case-insensitive, e.g. 'deit*' "
                                                                 "(default: all)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    parser.add_argument("--pretrained", action="store_true",
                        help="list the named weights instead (pretrained=True, --pretrained true): format, how the "
                             "download is verified, URL or Hub repository; and the variants whose published weights "
                             "have no stable download, with where they are")


def rows(pattern: str = "*") -> list[dict]:
    import fnmatch

    from vitkit.families.stats import fresh, read_all
    files = read_all()
    if fresh(files):  # every family folder has its counts (verified by the contract suite)
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


def pretrained_rows(pattern: str = "*") -> list[dict]:
    """One row per matching variant with named weights (``source``: the URL, or ``hf-hub:owner/repo/file``) or with
    published weights that have no stable download (``source`` None, ``no_stable_source``: where they are, and why)."""
    import vitkit
    from vitkit.weights.hub import hash_status, no_named_weights_reason
    names = vitkit.list_models(pattern)
    if not names:
        raise ValueError(f"no model matches {pattern!r}")
    out = []
    for name in names:
        spec = vitkit.get_spec(name)
        w = spec.weights
        if w is not None:
            hub = w.url.startswith("hf-hub:")
            out.append({"name": name, "family": spec.family, "format": w.source_format,
                        "source": f"{w.url}/{w.filename or 'model.safetensors'}" if hub else w.url,
                        "verified_by": hash_status(w), "sha256": w.sha256, "checkpoint_key": w.checkpoint_key,
                        "num_classes": w.num_classes, "notes": w.notes, "no_stable_source": None})
        elif (reason := no_named_weights_reason(spec)) is not None:
            out.append({"name": name, "family": spec.family, "format": None, "source": None, "verified_by": None,
                        "sha256": None, "checkpoint_key": None, "num_classes": None, "notes": "",
                        "no_stable_source": reason})
    return out


def format_pretrained(table: list[dict], pattern: str) -> str:
    named = [r for r in table if r["source"]]
    lines = []
    if named:
        header = ("model", "family", "format", "verified by", "source")
        body = [(r["name"], r["family"], r["format"] + (f" [{r['checkpoint_key']}]" if r["checkpoint_key"] else ""),
                 r["verified_by"], r["source"]) for r in named]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        lines = ["  ".join(f"{v:<{w}}" for v, w in zip(line, widths)).rstrip() for line in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
    else:
        lines.append(f"no variant matching {pattern!r} has named weights")
    missing = [r for r in table if not r["source"]]
    if missing:
        lines += ["", "published, but with no stable download (download by hand, pass the path as --pretrained):"]
        lines += [f"  {r['name']}: {r['no_stable_source']}" for r in missing]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        return _run_pretrained(args)
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


def _run_pretrained(args: argparse.Namespace) -> int:
    table = pretrained_rows(args.pattern)
    if args.format == "json":
        json.dump(table, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.format == "csv":
        fields = ("name", "family", "format", "verified_by", "source", "checkpoint_key", "num_classes",
                  "no_stable_source")
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(fields)
        writer.writerows([r[f] for f in fields] for r in table)
    else:
        print(format_pretrained(table, args.pattern))
    return 0
