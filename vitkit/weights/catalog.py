"""Public default weights of the registered variants (``create_model(name, pretrained=True)``).

Only releases that can be named from their public listings are here, and no hash is invented:
- DeiT: facebookresearch/deit README_deit.md model zoo (official ``{'model': state_dict}`` files); their file names
  carry the sha256 prefix that ``torch.hub`` checks (``-a1311bcf.pth``), and vitkit checks the same prefix.
- ViT: timm's Hugging Face Hub repositories (``timm/<variant>.<tag>``, ``model.safetensors``), verified by
  ``huggingface_hub`` itself. ``augreg`` = Steiner et al. 2021 (How to train your ViT), fine-tuned on ImageNet-1k from
  ImageNet-21k; ``orig`` = the ViT paper's own ImageNet-21k weights fine-tuned on ImageNet-1k. Google's ViT weights
  expect pixels scaled to [-1, 1] (mean = std = 0.5), which the ViT variants' preprocessing already says.
"""
from __future__ import annotations

from vitkit.registry import WeightSpec

__all__ = ["WEIGHTS"]

_DEIT_URL = "https://dl.fbaipublicfiles.com/deit/{}.pth"
_DEIT_FILES = {
    "deit_tiny_patch16_224": "deit_tiny_patch16_224-a1311bcf",  # 72.2 top-1 (README)
    "deit_small_patch16_224": "deit_small_patch16_224-cd65a155",  # 79.9
    "deit_base_patch16_224": "deit_base_patch16_224-b5f2ef4d",  # 81.8
    "deit_tiny_distilled_patch16_224": "deit_tiny_distilled_patch16_224-b40b3cf7",  # 74.5
    "deit_small_distilled_patch16_224": "deit_small_distilled_patch16_224-649709d9",  # 81.2
    "deit_base_distilled_patch16_224": "deit_base_distilled_patch16_224-df68dfff",  # 83.4
    "deit_base_patch16_384": "deit_base_patch16_384-8de9b5d1",  # 82.9
    "deit_base_distilled_patch16_384": "deit_base_distilled_patch16_384-d0272ac0",  # 85.2 (1000 epochs)
}

_TIMM_VIT = {  # variant → timm pretrained tag (ImageNet-1k top-1 that timm measured, results-imagenet.csv)
    "vit_tiny_patch16_224": "augreg_in21k_ft_in1k",  # 75.45
    "vit_tiny_patch16_384": "augreg_in21k_ft_in1k",  # 78.44
    "vit_small_patch16_224": "augreg_in21k_ft_in1k",  # 81.40
    "vit_small_patch16_384": "augreg_in21k_ft_in1k",  # 83.81
    "vit_base_patch16_224": "augreg_in21k_ft_in1k",  # 84.53
    "vit_base_patch16_384": "augreg_in21k_ft_in1k",  # 86.01
    "vit_base_patch32_224": "augreg_in21k_ft_in1k",  # 80.73
    "vit_large_patch16_224": "augreg_in21k_ft_in1k",  # 85.86
    "vit_large_patch16_384": "augreg_in21k_ft_in1k",  # 87.10
    "vit_large_patch32_384": "orig_in21k_ft_in1k",  # 81.51
}

WEIGHTS: dict[str, WeightSpec] = {
    **{name: WeightSpec(url=_DEIT_URL.format(f), source_format="official", filename=f"{f}.pth",
                        notes="facebookresearch/deit release") for name, f in _DEIT_FILES.items()},
    **{name: WeightSpec(url=f"hf-hub:timm/{name}.{tag}", source_format="timm", filename="model.safetensors",
                        notes=f"timm port, tag {tag}") for name, tag in _TIMM_VIT.items()},
}
