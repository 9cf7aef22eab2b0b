"""Reference outputs of CvT's official test-time transform (microsoft/CvT@f851e68
``lib/dataset/transformas/build.py`` ``build_transforms(cfg, is_train=False)``), for vitkit's ``crop_mode``. Nothing
of the official code is copied: the file is written out of the repository and imported,

    git show f851e68:lib/dataset/transformas/build.py > <scratch>/lib_dataset/transforms_build.py

with torchvision 0.28.0 (the release paired with torch 2.13; its fake-op registration module, which needs the CUDA
build's operators, replaced by an empty module) and an API shim for the ``timm.data.create_transform`` it imports (the
training branch only):

    PYTHONPATH=<scratch>:<shims>:<torchvision> python tests/families/cvt/data/make_eval_transform_case.py \
        ../shared/data/images tests/families/cvt/data/official_eval_transform.safetensors
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lib_dataset.transforms_build import build_transforms  # noqa: E402  (f851e68 build.py)

IMAGES, OUT = Path(sys.argv[1]), sys.argv[2]
# TEST.IMAGE_SIZE is [width, height]; CENTER_CROP False is the 384 configs' squash, True the 224 configs' default
CONFIGS = {"squash_64": ([64, 64], False), "squash_80x48": ([80, 48], False), "center_56": ([56, 56], True)}
CROPS = {"kodak_kodim01.png": (300, 200, 450, 300), "kodak_kodim05.png": (100, 50, 190, 190)}  # 150x100, 90x140


def config(size, center_crop):
    ns = types.SimpleNamespace
    return ns(AUG=ns(TIMM_AUG=ns(USE_TRANSFORM=True)), INPUT=ns(MEAN=[0.485, 0.456, 0.406], STD=[0.229, 0.224, 0.225]),
              TEST=ns(IMAGE_SIZE=size, CENTER_CROP=center_crop, INTERPOLATION=3))  # experiments/*.yaml: bicubic


out = {}
for i, (name, box) in enumerate(CROPS.items()):
    img = Image.open(IMAGES / name).convert("RGB").crop(box)
    out[f"image_{i}"] = torch.from_numpy(np.asarray(img).copy())  # (H, W, 3) uint8
    for key, (size, center_crop) in CONFIGS.items():
        out[f"{key}_{i}"] = build_transforms(config(size, center_crop), is_train=False)(img)  # (3, H, W) float32
save_file(out, OUT)
print({k: tuple(v.shape) for k, v in out.items()})
