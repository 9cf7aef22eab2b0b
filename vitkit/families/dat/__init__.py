"""DAT, the Deformable Attention Transformer (Xia et al., CVPR 2022, arXiv 2201.00520): local, shifted-window and
deformable attention in four stages.

``model.py`` the architecture, ``formats.py`` the official release layout (its rename table reads DAT++'s files too),
``catalog.py`` the variants and published sizes. DAT++ (``vitkit.families.dat_pp``) builds on this folder.
"""
from vitkit.families.contract import Family
from vitkit.families.dat import catalog
from vitkit.families.dat.formats import FORMATS
from vitkit.families.dat.model import DAT, DATConfig

__all__ = ["FAMILY", "DAT", "DATConfig"]

FAMILY = Family("dat", "DAT", "Xia et al. 2022, arXiv 2201.00520", DAT, catalog.VARIANTS, catalog.DATA_CFGS,
                formats=FORMATS, references=catalog.REFERENCES, tiny=catalog.tiny)
