"""The DAT++ variants (LeapLabTHU/DAT@32173fc ``configs/dat_*.yaml``, model name ``dat_plus_plus``), their evaluation
preprocessing, published sizes and the tiny test configuration. No weights are named: the official files are
published only behind share links, with no stable download URL (``NO_STABLE_SOURCE`` below); download them by hand
and pass the path (format "official")."""
from __future__ import annotations

from vitkit.specs import PreprocessConfig, Reference

# -------------------------------------------------------------------------------------------------- variants
# configs/dat_{tiny,small,base,base_384}.yaml at the repository head (MODEL.NAME dat_plus_plus); vitkit names them
# after the release files dat_pp_{tiny,small,base}_in1k_224.pth / dat_pp_base_in1k_384.pth.
VARIANTS = {
    "dat_pp_tiny": dict(),  # the config defaults
    "dat_pp_small": dict(dim_stem=96, dims=(96, 192, 384, 768), heads=(3, 6, 12, 24), groups=(1, 2, 3, 6),
                         drop_path_rate=0.4),
    "dat_pp_base": dict(dim_stem=128, dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), groups=(2, 4, 8, 16),
                        drop_path_rate=0.7),
}
# built at 224 (its tables) and evaluated at 384: DATA.IMG_SIZE 384, TEST.CROP False
VARIANTS["dat_pp_base_384"] = dict(VARIANTS["dat_pp_base"], img_size=384, table_img_size=224, drop_path_rate=0.6)
# data/build.py: bicubic, ImageNet mean/std, transforms.Resize((s, s)) (a squash, aspect not kept): 224 models to 256
# and centre-crop, the 384 model to 384 without cropping (TEST.CROP False)
DATA_CFGS = {name: PreprocessConfig(crop_pct=1.0 if name.endswith("384") else 0.875, crop_mode="squash")
             for name in VARIANTS}

# The official code (32173fc, configs/dat_*.yaml) counted with FlopCounterMode (MACs = FLOPs / 2): convs, dense layers
# and attention products, NATTEN's QK and AV as the H·W·k²·d products its kernels compute (through a counting
# stand-in for natten), grid_sample not counted. The paper's table (arXiv 2309.01430, as Papers with Code lists it)
# rounds these: DAT-T++ 24M / 4.3G, DAT-S++ 53M / 9.4G, DAT-B++ 93M / 16.6G, 49.7G at 384.
_MEASURED = {"dat_pp_tiny": (23.96, 4.259), "dat_pp_small": (53.13, 9.382), "dat_pp_base": (93.69, 16.502),
             "dat_pp_base_384": (93.69, 49.502)}
_SOURCE = ("official LeapLabTHU/DAT@32173fc code counted (FlopCounterMode, NATTEN products counted as k² per query); "
           "paper: DAT-T++ 24M/4.3G, S++ 53M/9.4G, B++ 93M/16.6G, 49.7G at 384")
REFERENCES = {name: Reference(params, gmacs, _SOURCE, macs_rtol=0.002) for name, (params, gmacs) in _MEASURED.items()}


def tiny(name: str, cfg: dict) -> dict:
    """Widths 16-128 on a 64×64 input (maps 16, 8, 4, 2; key grids 2×2): neighbourhood attention (a 5×5 window on
    the padded 4×4 map of stage 3), strided deformable attention, layer scale and the log-CPB bias in the last stage,
    all in milliseconds."""
    return dict(img_size=64, dim_stem=16, dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), heads=(1, 2, 2, 4),
                groups=(1, 1, 1, 2), stage_spec=(("N", "D"), ("N", "D"), ("N", "D"), ("D", "D")),
                nat_ksizes=(3, 3, 5, 3), layer_scale_values=(-1.0, -1.0, 0.1, 0.1), log_cpb=(False, False, False, True),
                table_img_size=None)


# ----------------------------------------------------------------------------------------------- named weights
# None. The official ImageNet-1k weights (DAT-T++ 83.9, DAT-S++ 84.6, DAT-B++ 84.9, DAT-B++@384 85.9; the README's
# example file name is dat_pp_tiny_in1k_224.pth) are listed in LeapLabTHU/DAT@32173fc README.md "Evaluate Pretrained
# Models on ImageNet-1K Classification" only as OneDrive share links (1drv.ms/u/s!...) and Tsinghua Cloud share pages
# (cloud.tsinghua.edu.cn/f/<id>/: 14c5ddae10b642e68089, 4c2a76360c964fbd81d5, 8e30492404d348d89f25,
# 032dc804cdf44bf18bb5). A share link answers with a web page, not the file, its owner can move or revoke it, and no
# hash is published, so no URL can be a catalog entry.
_PAGE = ("LeapLabTHU/DAT@32173fc README.md, section \"Evaluate Pretrained Models on ImageNet-1K Classification\" "
         "(https://github.com/LeapLabTHU/DAT/blob/32173fc/README.md"
         "#evaluate-pretrained-models-on-imagenet-1k-classification)")
_WHY = ("only as OneDrive and Tsinghua Cloud share links, which open a web page rather than the file and can be moved "
        "by their owner, with no published hash: there is no stable download URL to name")
NO_STABLE_SOURCE = {
    name: f"the official {label} weights are published on {_PAGE} {_WHY}"
    for name, label in (("dat_pp_tiny", "DAT-T++"), ("dat_pp_small", "DAT-S++"), ("dat_pp_base", "DAT-B++"),
                        ("dat_pp_base_384", "DAT-B++ 384x384"))}
