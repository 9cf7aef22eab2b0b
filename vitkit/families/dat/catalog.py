"""The DAT variants (LeapLabTHU/DAT@566a593, tag CVPR2022, ``configs/dat_*.yaml``), their evaluation preprocessing,
published sizes and the tiny test configuration. No weights are named: the official files are published only behind
share links, with no stable download URL (``NO_STABLE_SOURCE`` below); download them by hand and pass the path
(format "official")."""
from __future__ import annotations

from vitkit.specs import PreprocessConfig, Reference

# -------------------------------------------------------------------------------------------------- variants
# configs/dat_{tiny,small,base,base_384}.yaml at the CVPR2022 tag; the registered names are the configs' MODEL.NAME.
_DEEP = ("L", "D") * 9
VARIANTS = {
    "dat_tiny": dict(),  # the config defaults
    "dat_small": dict(depths=(2, 2, 18, 2), stage_spec=(("L", "S"), ("L", "S"), _DEEP, ("L", "D")),
                      drop_path_rate=0.3),
    "dat_base": dict(dim_stem=128, dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                     stage_spec=(("L", "S"), ("L", "S"), _DEEP, ("L", "D")), groups=(-1, -1, 4, 8),
                     drop_path_rate=0.5),
}
VARIANTS["dat_base_384"] = dict(VARIANTS["dat_base"], img_size=384, window_sizes=(12, 12, 12, 12))
# Official evaluation (data/build.py, TEST.CROP True in every v1 config): transforms.Resize((s, s)) with
# s = int(256/224 · size), a squash to a square (aspect not kept), centre-crop, bicubic, ImageNet mean/std:
# crop_mode "squash" with crop_pct 0.875 (floor(size / 0.875) = s at 224 and 384).
DATA_CFGS = {name: PreprocessConfig(crop_pct=0.875, crop_mode="squash") for name in VARIANTS}

# The official code (LeapLabTHU/DAT@566a593, configs/dat_*.yaml) counted with FlopCounterMode (MACs = FLOPs / 2: convs,
# dense layers and the attention matrix products; the two grid_sample calls, of the features and of the bias table,
# are not multiply-accumulates and are counted neither there nor here). DAT-B@384 has no published count; its
# reference is the official code counted the same way (paper: 49.8 G, unverified).
_SOURCE = ("official LeapLabTHU/DAT@566a593 code counted (FlopCounterMode); paper (arXiv 2201.00520): DAT-T 29M/4.6G, "
           "B 88M/15.8G")
REFERENCES = {
    "dat_tiny": Reference(28.32, 4.56, _SOURCE, macs_rtol=0.002),
    "dat_small": Reference(49.70, 8.96, _SOURCE, macs_rtol=0.002),
    "dat_base": Reference(87.88, 15.72, _SOURCE, macs_rtol=0.002),
    "dat_base_384": Reference(88.18, 49.45, "official LeapLabTHU/DAT@566a593 dat_base_384.yaml counted with "
                              "FlopCounterMode (paper: 49.8 G, unverified)", macs_rtol=0.002),
}


def tiny(name: str, cfg: dict) -> dict:
    """Widths 16-128 on a 64×64 input (maps 16, 8, 4, 2) with 2×2 windows: local, shifted and deformable blocks in
    milliseconds."""
    return dict(img_size=64, dim_stem=16, dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), heads=(1, 2, 2, 4),
                stage_spec=(("L", "S"), ("L", "S"), ("L", "D"), ("L", "D")), groups=(-1, -1, 1, 2),
                window_sizes=(2, 2, 2, 2))


# ----------------------------------------------------------------------------------------------- named weights
# None. The official ImageNet-1k weights (DAT-T 82.0, DAT-S 83.7, DAT-B 84.0, DAT-B@384 84.8; the README's example file
# name is dat_tiny_in1k_224.pth) are listed in LeapLabTHU/DAT@566a593 (tag CVPR2022) README.md "Evaluate Pretrained
# Models" only as Google Drive share pages (drive.google.com/file/d/<id>/view?usp=sharing: DAT-T
# 1I08oJlXNtDe8jJPxHkroxUi7lYX2lhVc, DAT-S 1UUmQqQYY5OInVuXvUgO41Gice93vJ0A7, DAT-B 1Avu16r59koxizoSYhfaCdNdr-QxLVGjd,
# DAT-B@384 1m8E2U4iQ6EOe1e8SuAGPbPlPhISXnVWq) and Tsinghua Cloud share pages (cloud.tsinghua.edu.cn/f/<id>/:
# 1367349deefc48efa650, f04b18081e3e4606adb7, a8d2a9645d454120b635, cf6a6b543cd64e0d8e43). A share page answers with
# a web page, not the file (Google Drive adds a confirmation step for large files), its owner can move or revoke it,
# and no hash is published, so no URL can be a catalog entry. The repository head (32173fc) lists DAT++'s files
# instead; the DAT files are on the CVPR2022 tag's README only.
_PAGE = ("LeapLabTHU/DAT@566a593 (tag CVPR2022) README.md, section \"Evaluate Pretrained Models\" "
         "(https://github.com/LeapLabTHU/DAT/blob/566a593/README.md#evaluate-pretrained-models)")
_WHY = ("only as Google Drive and Tsinghua Cloud share links, which open a web page rather than the file and can be "
        "moved by their owner, with no published hash: there is no stable download URL to name")
NO_STABLE_SOURCE = {
    name: f"the official {label} weights are published on {_PAGE} {_WHY}"
    for name, label in (("dat_tiny", "DAT-T"), ("dat_small", "DAT-S"), ("dat_base", "DAT-B"),
                        ("dat_base_384", "DAT-B 384x384"))}
