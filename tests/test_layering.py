"""The layering: the weight loaders do not import the registry (plain data specs live in the leaf module
vitkit.specs), evaluation does not import training (the run-folder layout lives in vitkit.runs), the model layers
import no family, and no shared package imports or names a family: what one family needs, the contract
(``vitkit.families.contract``) declares as a capability."""
from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import vitkit
from vitkit.registry import list_families

FAMILY_PACKAGES = tuple(f"vitkit.families.{name}" for name in list_families())
CASES = [
    ("vitkit.weights", ("vitkit.registry", *FAMILY_PACKAGES)),
    ("vitkit.specs", ("vitkit.registry", "vitkit.weights", "vitkit.families", "torch")),
    ("vitkit.evaluate", ("vitkit.train", *FAMILY_PACKAGES)),
    ("vitkit.runs", ("vitkit.train", "vitkit.evaluate", "torch")),
    ("vitkit.layers", ("vitkit.families", "vitkit.registry")),
    ("vitkit.train", FAMILY_PACKAGES),
    ("vitkit.explain", FAMILY_PACKAGES),
    ("vitkit.deploy", FAMILY_PACKAGES),
    ("vitkit.bench", FAMILY_PACKAGES),
    ("vitkit.cli.main", FAMILY_PACKAGES),
    ("vitkit.tokenizers", ("vitkit.registry", "vitkit.train", *FAMILY_PACKAGES)),
]


@pytest.mark.parametrize("module,forbidden", CASES, ids=[c[0] for c in CASES])
def test_module_does_not_import(module, forbidden):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(' '.join(m for m in {list(forbidden)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"


# ------------------------------------------------------------------------------------- no family names in shared code
PACKAGE = Path(vitkit.__file__).parent
SHARED = sorted(p for p in PACKAGE.rglob("*.py")
                if not any(p.is_relative_to(PACKAGE / "families" / f) for f in list_families()))
# Strings that name a registered model as user-facing text, not as knowledge of what it needs (and why).
ALLOWED_STRINGS = {
    "vitkit/cli": "help texts and examples name registered models, as a user would type them",
    "vitkit/train/config.py": "the default model of a recipe that names none",
    "vitkit/deploy/quantize.py": "the record of which model the int8 agreement was measured on",
}


def _family_words() -> re.Pattern:
    from vitkit.registry import _FAMILIES
    words = {w for f in _FAMILIES.values() for w in (f.name, f.label)}
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9])({alternatives})(?![A-Za-z0-9+])", re.IGNORECASE)


def _code_tokens(source: str):
    """(line, text, is_string) of every identifier and string literal that is not a docstring; comments are not
    tokens here. A string statement (a docstring) is skipped: it cites papers and official files."""
    previous = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and (previous is None or previous.type in (
                tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)):
            previous = tok
            continue
        if tok.type == tokenize.NAME:
            yield tok.start[0], tok.string.replace("_", " "), False
        elif tok.type in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)):
            yield tok.start[0], tok.string, True
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            previous = tok


def test_no_shared_module_names_a_family():
    """Identifiers and string literals of every shared module (all of vitkit but the family folders) name no
    registered family (by name or label). Docstrings and comments may cite papers and official files; a string
    that cites an official file at a commit (``owner/repo path@abc1234``) is a citation too."""
    words, found = _family_words(), []
    for path in SHARED:
        rel = path.relative_to(PACKAGE.parent).as_posix()
        allowed = any(rel.startswith(prefix) for prefix in ALLOWED_STRINGS)
        for line, text, is_string in _code_tokens(path.read_text()):
            if is_string and (allowed or re.search(r"@[0-9a-f]{7}", text)):
                continue
            hit = words.search(text.replace("vitkit", ""))
            if hit:
                found.append(f"{rel}:{line}: {hit.group(0)!r} in {text[:60]!r}")
    assert not found, "shared code names a family:\n" + "\n".join(found)


def test_the_family_name_check_finds_a_family_name(tmp_path):
    """The check above is not vacuous: a shared-looking module that tests for a family is caught, its docstring
    is not."""
    words = _family_words()
    source = '"""Swin\'s windows (a citation)."""\nif spec.family == "swin":\n    is_swin = True\n'
    hits = [text for _, text, _ in _code_tokens(source) if words.search(text)]
    assert hits == ['"swin"', "is swin"]
