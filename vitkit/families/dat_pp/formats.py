"""Checkpoint format of DAT++: the official release files of LeapLabTHU/DAT at the repository head (32173fc,
``dat_pp_*_in1k_*.pth``).

DAT++ saves what DAT v1 saves (``{'model': state_dict}``, the same module names, plus its own parts), and one rename
table reads both versions' files, so the table and the converter are DAT's (``vitkit.families.dat.formats``:
``official_keymap``, ``from_official``); DAT's format takes a file without any part only DAT++ has, this one a file
with one (``is_dat_pp``). timm and transformers have no DAT++.
"""
from __future__ import annotations

from vitkit.families.dat.formats import from_official, is_dat_layout, is_dat_pp, official_hints
from vitkit.specs import SourceFormat

__all__ = ["FORMATS"]

OFFICIAL_FORMAT = SourceFormat(
    "official", lambda view: is_dat_layout(view) and is_dat_pp(view.keys), from_official, official_hints,
    description="LeapLabTHU/DAT release file of DAT++ (repository head): {'model': state_dict}")

FORMATS = (OFFICIAL_FORMAT,)
