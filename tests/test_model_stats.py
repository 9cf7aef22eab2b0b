"""Fast listing: ``vitkit models`` reads precomputed per-family stats (``vitkit/families/<family>/stats.json``), which
must be current for every registered variant (their counts are verified for every variant by
``test_contract.py::test_size_matches_the_published_reference``); a stale or missing entry is counted on the fly; the
listing needs neither torch nor more than 2 s; editing a family's code without changing a count forces no refresh."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

import vitkit
from vitkit.bench import flops
from vitkit.bench.flops import model_stats, stats_rows
from vitkit.families import stats

UPDATE = "python -m vitkit.bench.flops --update"


def test_every_registered_variant_has_a_current_entry():
    files = stats.read_all()
    entries = {name: (family, e) for family, data in files.items() for name, e in data["variants"].items()}
    missing = [n for n in vitkit.list_models() if n not in entries]
    stale = [n for n in vitkit.list_models() if n in entries and not flops._is_current(n, entries[n][1])]
    assert not missing and not stale, f"missing {missing}, stale {stale}: run `{UPDATE}`"
    unregistered = sorted(set(entries) - set(vitkit.list_models()))
    assert not unregistered, f"stats for variants no longer registered: {unregistered}; run `{UPDATE}`"
    for name, (family, _) in entries.items():
        assert vitkit.get_spec(name).family == family
    assert stats.fresh(files), f"a family folder has no stats.json; run `{UPDATE}`"


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_base_patch32_384"])
def test_stored_counts_equal_a_fresh_count(name):
    entry = next(d["variants"][name] for d in stats.read_all().values() if name in d["variants"])
    s = model_stats(name)
    assert (entry["params"], entry["macs"], tuple(entry["input_size"])) == (s.params, s.macs, s.input_size)


def test_missing_or_stale_entries_are_counted(monkeypatch):
    files = stats.read_all()
    vit = files["vit"]
    reference = dict(vit["variants"]["vit_tiny_patch16_224"])
    stale = {**vit["variants"], "vit_tiny_patch16_224": {**reference, "macs": 1, "fingerprint": "0" * 16}}
    missing = {k: v for k, v in vit["variants"].items() if k != "vit_small_patch16_224"}
    for variants in (stale, missing):
        monkeypatch.setattr(stats, "read_all", lambda v=variants: {**files, "vit": {**vit, "variants": v}})
        rows = {r["name"]: r for r in stats_rows(["vit_tiny_patch16_224", "vit_small_patch16_224"], progress=False)}
        assert rows["vit_tiny_patch16_224"]["macs"] == reference["macs"]
        assert rows["vit_small_patch16_224"]["params"] == model_stats("vit_small_patch16_224").params


def test_cli_rows_from_files_equal_counted_rows():
    from vitkit.cli.models import rows
    names = vitkit.list_models("deit_tiny*")
    assert rows("deit_tiny*") == [model_stats(n).as_dict() for n in names]


@pytest.mark.serial
def test_listing_every_model_is_fast_and_does_not_import_torch():
    code = ("import sys, time; t = time.perf_counter(); from vitkit.cli.main import main; main(['models']); "
            "print('torch' in sys.modules, time.perf_counter() - t, file=sys.stderr)")
    best = None
    for _ in range(2):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        wall = time.perf_counter() - start
        assert r.returncode == 0, r.stderr
        best = wall if best is None else min(best, wall)
    imported, _ = r.stderr.split()
    assert imported == "False"
    assert len(r.stdout.splitlines()) == 2 + len(vitkit.list_models())
    from timing import overloaded
    if not overloaded():
        assert best < 2.0, f"vitkit models took {best:.2f} s"


def test_freshness_needs_a_file_per_family_folder_not_unchanged_code(tmp_path, monkeypatch):
    """A new family folder without a stats file sends `vitkit models` to the registry; an edited family module (a
    docstring, a comment) does not: the counts are verified by the contract suite, not by hashing the code."""
    import shutil
    families = tmp_path / "families"
    shutil.copytree(stats.FAMILIES_DIR, families, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(stats, "FAMILIES_DIR", families)
    files = stats.read_all()
    assert stats.fresh(files) and set(files) == set(vitkit.registry.list_families())
    model = families / "swin" / "model.py"
    model.write_text(model.read_text() + "\n# edited\n")
    assert stats.fresh(stats.read_all())
    (families / "newfam").mkdir()
    (families / "newfam" / "__init__.py").write_text("FAMILY = None\n")
    assert not stats.fresh(stats.read_all())
