"""DAT++ (Xia et al., arXiv 2309.01430): DAT's trunk (``vitkit.families.dat``) with neighbourhood attention, strided
deformable attention, local perception units and a conv stem.

``model.py`` the architecture, ``formats.py`` the official release format (DAT's rename table), ``catalog.py`` the
variants and published sizes.
"""
from vitkit.families.contract import Family
from vitkit.families.dat_pp import catalog
from vitkit.families.dat_pp.formats import FORMATS
from vitkit.families.dat_pp.model import DATPlusPlus, DATPPConfig

__all__ = ["FAMILY", "DATPlusPlus", "DATPPConfig"]

FAMILY = Family("dat_pp", "DAT++", "Xia et al. 2023, arXiv 2309.01430", DATPlusPlus, catalog.VARIANTS,
                catalog.DATA_CFGS, formats=FORMATS, references=catalog.REFERENCES, tiny=catalog.tiny, parent="dat")
