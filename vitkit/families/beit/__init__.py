"""BEiT (Bao et al., ICLR 2022, arXiv 2106.08254): the fine-tuning model of microsoft/unilm
``beit/modeling_finetune.py``, a ViT with relative-position bias tables, layer scale and mean pooling, and the
masked-image-modelling model of ``beit/modeling_pretrain.py`` (``mim_vocab_size``: a mask token and ``lm_head``;
``masked_token_logits``). A sub-family of ViT (``vitkit.families.vit``, its parent): ``BeitConfig`` and ``Beit``
subclass ViT's config and model.

``model.py`` the architecture, ``formats.py`` the official / timm / transformers layouts and how each resizes,
``catalog.py`` the variants, layer decay and named weights.
"""
from vitkit.families.beit import catalog
from vitkit.families.beit.formats import FORMATS, RESIZE, RESIZE_CHOICES
from vitkit.families.beit.model import Beit, BeitConfig
from vitkit.families.contract import Family

__all__ = ["FAMILY", "BeitConfig", "Beit"]

FAMILY = Family("beit", "BEiT", "Bao et al. 2021, arXiv 2106.08254", Beit, catalog.VARIANTS, catalog.DATA_CFGS,
                formats=FORMATS, weights=catalog.WEIGHTS, references=catalog.REFERENCES, tiny=catalog.tiny,
                train_defaults=catalog.TRAIN_DEFAULTS, resize=RESIZE, resize_choices=RESIZE_CHOICES, parent="vit",
                # fine-tuning a pre-trained model (official run_class_finetuning.py): no MIM head, one table per
                # block (the shared one copied into each), the pooling of the variant
                task_fields=("representation_size", "mim_vocab_size", "use_shared_rel_pos_bias", "use_rel_pos_bias",
                             "global_pool"))
