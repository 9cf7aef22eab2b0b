"""Another input size, for every family and every source format it loads: a checkpoint's position tables
are resized the way its own source's code resizes them, checked against that code's output, and the load report
names the scheme and the file@commit it follows.

The references, each made by running the official resize code on random weights (the README beside each names the
repository and commit, and the generator script):

| family | source | reference | official code |
| --- | --- | --- | --- |
| ViT | jax (vit_jax) | families/vit/data/jax/reference_16px.npz | vit_jax/checkpoint.py load_pretrained + the JAX model |
| ViT | jax (big_vision) | families/vit/data/jax/reference_16px.npz | big_vision/models/vit.py load + the big_vision model |
| ViT | timm, vitkit | families/vit/data/timm_vit_tiny_shrunk | vit_jax interpolate_posembed, then timm's model |
| DeiT | official, timm, vitkit | families/deit/data/official_deit_tiny_distilled_shrunk | deit main.py --finetune block |
| BEiT | official, timm, vitkit | families/beit/data/resize_160_io.safetensors | unilm run_class_finetuning.py loading block |
| T2T-ViT | official, vitkit | families/t2t_vit/data/performer_64/resize_96_official.safetensors | utils.load_for_transfer_learning |
| ViT, DeiT, BEiT | hf | built here | transformers' forward with interpolate_pos_encoding=True |

MobileViT has no position table; at another size its blocks resize feature maps that are not multiples of the patch
(bilinear, align_corners=False, to the next multiple and back), the same in the three sources' code, which the load
report names. Those cases are in test_mobilevit.py: official (families/mobilevit/data/official_shrunk_io.safetensors,
ml-cvnets), timm (families/mobilevit/data/timm_shrunk_io.safetensors, and the golden timm_mobilevit_xxs at 200x200 and 256x160:
families/mobilevit/data/timm_golden_xxs_resize_logits.safetensors; timm 1.0.31 mobilevit.py), transformers (the twin at 100x72).

A vitkit folder has no resize code of its own: it follows the family's official code, so its cases reuse the
references of the official (or, for ViT, the timm) case. Every case is also loaded with each other scheme, which must
miss the reference: the references tell the schemes apart.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.layers.pos_embed_rel import RESIZE_METHODS
from vitkit.registry import get_spec

from conftest import eval_forward, golden_close, max_diff, randomize_

DATA = Path(__file__).parent / "families"  # every case's files are under its family's data folder
JAX_FIXTURES = json.loads((DATA / "vit" / "data" / "jax" / "fixtures.json").read_text())["fixtures"]
VIT_JAX = "google-research/vision_transformer vit_jax/checkpoint.py@c6de1e5"
BIG_VISION = "google-research/big_vision big_vision/models/vit.py@0127fb6"
DEIT = "facebookresearch/deit main.py@7e160fe"
UNILM = "microsoft/unilm beit/run_class_finetuning.py@768a3c8"
T2T = "yitu-opensource/T2T-ViT utils.py@0f63dc9"
HF = "transformers 5.25.0 models/{0}/modeling_{0}.py"
SHRUNK = dict(embed_dim=48, depth=2)
BEIT_SHRUNK = dict(embed_dim=48, depth=2, num_heads=3)
T2T_KW = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16, qk_scale=32 ** -0.5)


@dataclass(frozen=True)
class Case:
    model: str
    format: str
    checkpoint: str  # under tests/families; "vitkit:<case>" = that case's file saved by vitkit at its own size; "hf"
    small: int  # the checkpoint's input size
    size: int  # the size it is loaded at
    kwargs: dict
    reference: tuple[str, str, str]  # (file under tests/families, pixels key, logits key)
    source: str  # what every resized line of the report names
    scheme: str  # the absolute table's scheme ("" when the model has no absolute table)
    rel_pos: str = ""  # the relative-position tables' method, when the model has them
    hf: dict = field(default_factory=dict)  # the transformers config of an "hf" case


def _jax(name: str) -> Case:
    big = name.startswith("big_vision")
    return Case("vit_tiny_patch16_224", "jax", f"vit/data/jax/{name}.npz", 8, 16, JAX_FIXTURES[name]["kwargs"],
                ("vit/data/jax/reference_16px.npz", "pixel_values", f"{name}/logits"), BIG_VISION if big else VIT_JAX,
                "zoom_linear")


_VIT_TIMM = Case("vit_tiny_patch16_224", "timm", "vit/data/timm_vit_tiny_shrunk/model.safetensors", 64, 96, SHRUNK,
                 ("vit/data/timm_vit_tiny_shrunk/io.safetensors", "pixel_values_96", "logits_96"), VIT_JAX,
                 "zoom_linear")
_DEIT_CASE = "deit/data/official_deit_tiny_distilled_shrunk"
_DEIT = Case("deit_tiny_distilled_patch16_224", "official", f"{_DEIT_CASE}/checkpoint.pth", 64, 96, SHRUNK,
             (f"{_DEIT_CASE}/io.safetensors", "pixel_values_96", "logits_96"), DEIT, "bicubic")
_BEIT_IO = "beit/data/resize_160_io.safetensors"
_BEIT = Case("beit_base_patch16_224", "official", "beit/data/finetuned_abs_112.pth", 112, 160, BEIT_SHRUNK,
             (_BEIT_IO, "pixel_values_160", "abs_logits_160"), UNILM, "bicubic", rel_pos="geometric")
_T2T = Case("t2t_vit_7", "official", "t2t_vit/data/performer_64/checkpoint.pth.tar", 64, 96, T2T_KW,
            ("t2t_vit/data/performer_64/resize_96_official.safetensors", "", "logits_96"), T2T, "bicubic")
_HF_KW = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=48,
              patch_size=16, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

CASES = {
    **{f"vit-jax-{n}": _jax(n) for n in ("vit_jax_linen", "vit_jax_pre_linen", "vit_jax_pre_logits",
                                          "big_vision_scan_tok", "big_vision_scan_gap")},
    "vit-timm": _VIT_TIMM,
    "vit-vitkit": dataclasses.replace(_VIT_TIMM, format="vitkit", checkpoint="vitkit:vit-timm"),
    "vit-hf": Case("vit_tiny_patch16_224", "hf", "hf", 48, 80, {}, ("", "", ""), HF.format("vit"), "bicubic",
                   hf=_HF_KW),
    "deit-official": _DEIT,
    "deit-timm": dataclasses.replace(_DEIT, format="timm", checkpoint=f"{_DEIT_CASE}/model.safetensors"),
    "deit-vitkit": dataclasses.replace(_DEIT, format="vitkit", checkpoint="vitkit:deit-official"),
    "deit-hf": Case("deit_tiny_distilled_patch16_224", "hf", "hf", 48, 80, {}, ("", "", ""), HF.format("deit"),
                    "bicubic", hf=_HF_KW),
    "beit-official-rel-only": dataclasses.replace(_BEIT, checkpoint="beit/data/finetuned_112.pth", scheme="",
                                                  reference=(_BEIT_IO, "pixel_values_160", "finetuned_logits_160")),
    "beit-official": _BEIT,
    "beit-timm": dataclasses.replace(_BEIT, format="timm", checkpoint="beit/data/finetuned_abs_112.safetensors"),
    "beit-vitkit": dataclasses.replace(_BEIT, format="vitkit", checkpoint="vitkit:beit-official"),
    "beit-hf": Case("beit_base_patch16_224", "hf", "hf", 48, 80, {}, ("", "", ""), HF.format("beit"), "bicubic",
                    rel_pos="bilinear", hf=dict(_HF_KW, use_absolute_position_embeddings=True,
                                                use_relative_position_bias=True, use_mean_pooling=True,
                                                layer_scale_init_value=0.1, drop_path_rate=0.0)),
    "t2t-official": _T2T,
    "t2t-vitkit": dataclasses.replace(_T2T, format="vitkit", checkpoint="vitkit:t2t-official"),
}
_HF_CLASSES = {"vit_tiny_patch16_224": ("ViTForImageClassification", "ViTConfig"),
               "deit_tiny_distilled_patch16_224": ("DeiTForImageClassificationWithTeacher", "DeiTConfig"),
               "beit_base_patch16_224": ("BeitForImageClassification", "BeitConfig")}


class _Made:
    """Checkpoints and references made at test time: vitkit folders saved from a case's file at its own size, and
    the transformers models (reference: their own forward at the new size, ``interpolate_pos_encoding=True``)."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def checkpoint(self, name: str, case: Case) -> str:
        if case.checkpoint == "hf":
            return self._hf(name, case)[0]
        if not case.checkpoint.startswith("vitkit:"):
            return str(DATA / case.checkpoint)
        if name not in self.cache:
            source = CASES[case.checkpoint.removeprefix("vitkit:")]
            model = vitkit.create_model(source.model, pretrained=str(DATA / source.checkpoint), img_size=case.small,
                                        **source.kwargs)
            self.cache[name] = vitkit.save_pretrained(model, self.root / name)
        return self.cache[name]

    def reference(self, name: str, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        if case.checkpoint == "hf":
            return self._hf(name, case)[1:]
        file, pixels, logits = case.reference
        io = dict(np.load(DATA / file)) if file.endswith(".npz") else load_file(str(DATA / file))
        if not pixels:  # the T2T reference ran on performer_64's own 96-px pixels
            pixels, io = "pixel_values_96", {**io, **load_file(str(DATA / "t2t_vit/data/performer_64/io.safetensors"))}
        return torch.as_tensor(io[pixels]).float(), torch.as_tensor(io[logits])

    def _hf(self, name: str, case: Case):
        if name not in self.cache:
            transformers = pytest.importorskip("transformers")
            model_cls, config_cls = (getattr(transformers, n) for n in _HF_CLASSES[case.model])
            hf = randomize_(model_cls(config_cls(**case.hf)), seed=21).eval()
            hf.save_pretrained(self.root / name)
            x = torch.randn(2, 3, case.size, case.size, generator=torch.Generator().manual_seed(22))
            with torch.no_grad():
                ref = hf(pixel_values=x, interpolate_pos_encoding=True).logits
            self.cache[name] = (str(self.root / name), x, ref)
        return self.cache[name]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> _Made:
    return _Made(tmp_path_factory.mktemp("resize"))


def _load(made: _Made, name: str, **kw) -> torch.nn.Module:
    case = CASES[name]
    return vitkit.create_model(case.model, pretrained=made.checkpoint(name, case), img_size=case.size,
                               **case.kwargs, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_another_size_gives_the_source_codes_logits(made, name):
    case = CASES[name]
    x, ref = made.reference(name, case)
    model = _load(made, name)
    assert model.load_report.format == case.format
    out = eval_forward(model, x)
    assert ref.std() > 0.1 and golden_close(out, ref), f"max |diff| {max_diff(out, ref):.2e}"
    resized = model.load_report.resized
    assert resized and all(case.source in line for line in resized), resized
    expected = {"bicubic": "bicubic without antialias", "zoom_linear": "linear, corners aligned", "": "window"}
    assert any(expected[case.scheme] in line for line in resized)
    if case.rel_pos:
        assert sum(f", {case.rel_pos}: " in line for line in resized) == 2  # one table per block


OTHER_SCHEMES = [(name, other) for name, case in sorted(CASES.items()) if case.scheme
                 for other in get_spec(case.model).resize_choices if other not in (case.scheme, "sinusoid")]


@pytest.mark.parametrize("name,other", OTHER_SCHEMES)
def test_another_scheme_misses_the_reference(made, name, other):
    """``pos_embed_resize=`` replaces the source's scheme (and the report says so): each other scheme misses the
    reference's tolerance, so the match above is not a coincidence."""
    case = CASES[name]
    x, ref = made.reference(name, case)
    model = _load(made, name, pos_embed_resize=other)
    line = next(r for r in model.load_report.resized if r.startswith("pos_embed"))
    assert f"chosen with pos_embed_resize={other!r}" in line
    assert not golden_close(eval_forward(model, x), ref)


REL_METHODS = [(name, other) for name, case in sorted(CASES.items()) if case.rel_pos
               for other in RESIZE_METHODS if other != case.rel_pos]


@pytest.mark.parametrize("name,other", REL_METHODS)
def test_another_relative_table_method_misses_the_reference(made, name, other, monkeypatch):
    case = CASES[name]
    x, ref = made.reference(name, case)
    resize = get_spec(case.model).resize
    monkeypatch.setitem(resize, case.format, dataclasses.replace(resize[case.format], rel_pos=other))
    model = _load(made, name)
    assert any(f", {other}: " in r for r in model.load_report.resized)
    assert not golden_close(eval_forward(model, x), ref)


def test_every_format_of_these_families_has_a_rule_and_a_case():
    """Each family maps every format it reads (and vitkit's folders) to a rule, and this file has a case for each."""
    covered = {(get_spec(c.model).family, c.format) for c in CASES.values()}
    for model in ("vit_tiny_patch16_224", "deit_tiny_patch16_224", "beit_base_patch16_224", "t2t_vit_7"):
        spec = get_spec(model)
        formats = {f.name for f in spec.formats} | {"vitkit"}
        assert formats <= set(spec.resize), (spec.family, formats - set(spec.resize))
        if model != "deit_tiny_patch16_224":  # the distilled DeiT cases stand for the family
            assert {(spec.family, f) for f in formats} <= covered


# ------------------------------------------------------------------------------------------ choosing a scheme
def test_pos_embed_resize_is_validated_before_anything_is_read(made):
    with pytest.raises(ValueError, match="choose from bicubic, bicubic_antialias, zoom_linear, bilinear"):
        vitkit.create_model("deit_tiny_patch16_224", pretrained="/nonexistent.pth", pos_embed_resize="lanczos")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        vitkit.create_model("deit_tiny_patch16_224", img_size=384, pos_embed_resize="bicubic_antialias")
    with pytest.raises(ValueError, match="is not a scheme"):  # a learned table is not a formula
        vitkit.create_model("vit_tiny_patch16_224", pretrained="/nonexistent.pth", pos_embed_resize="sinusoid")


def test_a_family_without_a_choice_refuses_it():
    with pytest.raises(ValueError, match="no position table whose resize can be chosen"):
        vitkit.create_model("swin_tiny_patch4_window7_224", pretrained="/nonexistent.pth", pos_embed_resize="bicubic")


def test_img_size_without_a_checkpoint_resizes_nothing():
    model = vitkit.create_model("deit_tiny_patch16_224", img_size=96, depth=1)
    assert model.pos_embed.shape == (1, 1 + 36, 192) and model.load_report is None


def test_the_recipe_names_a_bad_choice():
    from vitkit.config import ConfigError, from_dict
    from vitkit.train.config import ModelSection
    with pytest.raises(ConfigError, match="model.pos_embed_resize: .*choose from"):
        from_dict(ModelSection, {"name": "deit_tiny_patch16_224", "pretrained": "x.pth", "pos_embed_resize": "nearest"})
    section = from_dict(ModelSection, {"name": "t2t_vit_7", "pretrained": "x.pth", "pos_embed_resize": "sinusoid"})
    assert section.pos_embed_resize == "sinusoid"
