"""One folder per model family, each the whole of what is particular to it.

``vitkit/families/<name>/``: ``model.py`` (the architecture), ``formats.py`` (checkpoint layouts → vitkit's, pure
``state_dict → state_dict`` functions with explicit rename tables), ``catalog.py`` (variants, data configs, named
weights and, in ``NO_STABLE_SOURCE``, published weights that have no stable download, published sizes, the tiny
test configuration) and ``__init__.py``, which declares ``FAMILY = Family(...)`` (``vitkit.families.contract``). The
registry reads those declarations; shared code (train, evaluate, explain, deploy, bench, cli, weights, layers) calls
only the contract. Adding a family means adding a folder (and ``vitkit/layers`` when it brings a new layer).
"""


def no_stable_source(family: str, variant: str) -> str | None:
    """Why ``variant`` has no named weights although its authors published some: the family catalog's
    ``NO_STABLE_SOURCE`` entry (the official page, and why none of its files can be a catalog entry), or None (also
    for a family that is not a folder here)."""
    import importlib
    name = f"{__name__}.{family}.catalog"
    try:
        catalog = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if not name.startswith(e.name or "\0"):  # a catalog that fails to import is a bug, not "no catalog"
            raise
        return None
    return getattr(catalog, "NO_STABLE_SOURCE", {}).get(variant)
