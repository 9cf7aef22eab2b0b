"""vitkit.evaluate metrics, eval preprocessing and `vitkit eval`, checked against hand computations, scikit-learn and
transformers' PIL image processor (independent references)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import vitkit
from vitkit.cli.main import main
from vitkit.data import DataConfig, FakeData, collate_skip_none
from vitkit.evaluate import EvalResult, eval_transform, evaluate, imagenet_class_names, save_eval_artifacts
from vitkit.evaluate.eval_data import resolve_data_config
from vitkit.evaluate.preprocess import resize_size
from vitkit.registry import PreprocessConfig

from conftest import require

# A tiny ViT whose predictions depend strongly on the input (average pooling, large head weights), so confusion
# matrices computed on noise images are far from one column.
TINY = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=10, global_pool="avg",
            class_token=False)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY).eval()
    nn.init.normal_(model.head.weight, std=3.0)
    model.data_cfg = dataclasses.replace(model.data_cfg, crop_pct=1.0)  # 16 px data reaches the model unresized
    return model


# ---------------------------------------------------------------------------------------- metrics, by hand
# 6 classes, 8 samples. Each sample's logits are 5, 4, 3, 2, 1, 0 given to the classes in RANKINGS[i] order, so
# its top-1 is RANKINGS[i][0] and its label sits at a known rank.
RANKINGS = [
    [0, 1, 2, 3, 4, 5],  # label 0 at rank 1
    [1, 0, 2, 3, 4, 5],  # label 0 at rank 2
    [1, 2, 3, 4, 5, 0],  # label 1 at rank 1
    [2, 3, 4, 5, 0, 1],  # label 1 at rank 6: outside the top 5
    [2, 0, 1, 3, 4, 5],  # label 2 at rank 1
    [0, 1, 2, 4, 5, 3],  # label 3 at rank 6: outside the top 5
    [4, 0, 1, 2, 3, 5],  # label 4 at rank 1
    [0, 1, 2, 4, 3, 5],  # label 4 at rank 4
]
LABELS = [0, 0, 1, 1, 2, 3, 4, 4]  # class 5 never occurs
RANKS = [1, 2, 1, 6, 1, 6, 1, 4]


def _known_logits() -> torch.Tensor:
    logits = torch.zeros(len(RANKINGS), 6)
    for i, order in enumerate(RANKINGS):
        for rank, cls in enumerate(order):
            logits[i, cls] = 5.0 - rank
    return logits


class _Lookup(nn.Module):
    """'Model' returning row ``x[:, 0, 0, 0]`` of a logits table (the loader sends sample indices as images)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.num_classes = table.shape[1]
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


def _index_loader(labels: list[int], batch_size: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    items = [(torch.full((3, 2, 2), float(i)), y) for i, y in enumerate(labels)]
    batches = [collate_skip_none(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    return batches + [collate_skip_none([None, None])]  # an all-unreadable batch must be skipped


def test_evaluate_matches_hand_computation():
    result = evaluate(_Lookup(_known_logits()), _index_loader(LABELS), progress=False)
    assert result.num_samples == 8
    assert result.top1 == pytest.approx(4 / 8)  # ranks equal to 1: samples 0, 2, 4, 6
    assert result.top5 == pytest.approx(6 / 8)  # all but the two rank-6 samples
    lse = math.log(sum(math.exp(k) for k in range(6)))
    assert result.loss == pytest.approx(sum(lse - (6 - r) for r in RANKS) / 8, rel=1e-6)
    expected = np.zeros((6, 6), dtype=np.int64)
    for order, y in zip(RANKINGS, LABELS):
        expected[y, order[0]] += 1
    assert (result.confusion == expected).all()
    assert expected[0, 0] == 1 and expected[0, 1] == 1 and expected[3, 0] == 1  # the table above, read by eye
    assert result.per_class_acc[:5] == pytest.approx([0.5, 0.5, 1.0, 0.0, 0.5])
    assert math.isnan(result.per_class_acc[5])  # no samples of class 5


def test_top5_absent_below_five_classes_and_bad_labels_rejected():
    table = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    result = evaluate(_Lookup(table), _index_loader([0, 1]), progress=False)
    assert result.top5 is None and result.top1 == 0.5
    with pytest.raises(ValueError, match="outside"):
        evaluate(_Lookup(table), _index_loader([0, 3]), progress=False)


class _LeftRight(nn.Module):
    """Two classes scored by the mean of the left and of the right half of the image: mirroring swaps them."""

    num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.stack((x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))), dim=1)  # (B, 2)


def test_hflip_tta_averages_an_image_and_its_mirror():
    from vitkit.evaluate import FlipAverage, with_tta
    x = torch.randn(4, 3, 5, 6)
    model = _LeftRight()
    mirrored = x[..., torch.arange(5, -1, -1)]  # columns reversed by index, not by Tensor.flip
    assert torch.allclose(FlipAverage(model)(x), (model(x) + model(mirrored)) / 2)
    assert with_tta(model, "none") is model
    with pytest.raises(ValueError, match="hflip.*'vflip'"):
        with_tta(model, "vflip")
    # left-bright images of class 0: right without TTA; with it both scores tie and argmax takes class 0 anyway,
    # so use right-bright images of class 1: correct plain, a tie (argmax: class 0, wrong) under TTA
    images = torch.zeros(4, 3, 2, 4)
    images[..., 2:] = 1.0
    loader = [(images, torch.ones(4, dtype=torch.long))]
    assert evaluate(model, loader, progress=False).top1 == 1.0
    flipped = evaluate(with_tta(model, "hflip"), loader, progress=False)
    assert flipped.top1 == 0.0 and flipped.loss == pytest.approx(math.log(2), rel=1e-6)  # equal logits


def test_evaluate_restores_training_mode():
    model = _Lookup(_known_logits()).train()
    evaluate(model, _index_loader(LABELS), progress=False)
    assert model.training


def test_save_eval_artifacts_contents(tmp_path):
    result = evaluate(_Lookup(_known_logits()), _index_loader(LABELS), progress=False)
    names = ["ant", "bee", "cat", "dog", "eel", "fox"]
    paths = save_eval_artifacts(result, tmp_path, class_names=names)
    assert set(paths) == {"metrics", "per_class", "confusion_csv", "confusion_png"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["top1"] == 0.5 and metrics["top5"] == 0.75 and metrics["num_samples"] == 8
    assert metrics["per_class_acc"][5] is None and metrics["class_names"] == names
    rows = list(csv.reader((tmp_path / "confusion_matrix.csv").open()))
    assert rows[0][1:] == names
    assert [r[0] for r in rows[1:]] == names
    assert np.array([[int(v) for v in r[1:]] for r in rows[1:]]).tolist() == result.confusion.tolist()
    per_class = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    assert [(r["class"], r["support"], r["correct"]) for r in per_class][:2] == [("ant", "2", "1"), ("bee", "2", "1")]
    assert per_class[5]["accuracy"] == ""
    with Image.open(tmp_path / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.width > 300


def test_save_eval_artifacts_many_classes(tmp_path):
    K = 30
    conf = np.diag(np.arange(1, K + 1))
    result = EvalResult(1.0, 1.0, 0.0, [1.0] * K, conf, int(conf.sum()), None)
    paths = save_eval_artifacts(result, tmp_path)
    assert "confusion_png" in paths
    rows = list(csv.reader((tmp_path / "confusion_matrix.csv").open()))
    assert rows[0][1] == "class_0" and len(rows) == K + 1


# -------------------------------------------------------------------------------------------- preprocessing
def _photo_like(width: int, height: int) -> Image.Image:
    """A smooth colour image with some edges (gradients plus a disc)."""
    yy, xx = np.mgrid[0:height, 0:width]
    r = 255 * xx / width
    g = 255 * yy / height
    b = 255.0 * (((xx - width / 2) ** 2 + (yy - height / 3) ** 2) < (min(width, height) / 4) ** 2)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8))


def test_resize_sizes_follow_timm():
    # shorter side floor(224 / 0.875) = 256, longer side truncated as torchvision's Resize(int)
    assert resize_size(451, 300, (224, 224), 0.875) == (384, 256)  # 256 * 451 / 300 = 384.85
    assert resize_size(300, 451, (224, 224), 0.875) == (256, 384)
    assert resize_size(640, 427, (224, 224), 0.9) == (371, 248)  # floor(224 / 0.9) = 248; 248 * 640 / 427 = 371.7
    # non-square target (H, W) = (224, 320) at crop 1.0: scale to cover both sides, aspect kept
    assert resize_size(400, 400, (224, 320), 1.0) == (320, 320)


def test_eval_transform_equals_transformers_pil_processor():
    processors = require("transformers.models.deit.image_processing_pil_deit")
    img = _photo_like(300, 200)  # 200 → 256, 300 → 384: even crop offsets, where transformers and timm agree
    cfg = PreprocessConfig(input_size=(3, 224, 224), crop_pct=0.875)
    ref = processors.DeiTImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                           image_mean=list(cfg.mean), image_std=list(cfg.std))
    expected = ref(img, return_tensors="pt")["pixel_values"][0]
    ours = eval_transform(cfg)(img)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_eval_transform_crop_normalise_and_bgr_by_hand():
    # crop_pct 1 and an image already at the input size: no resize, so the output is (x / 255 - mean) / std
    img = _photo_like(32, 32)
    cfg = PreprocessConfig(input_size=(3, 32, 32), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125), crop_pct=1.0)
    arr = np.asarray(img, dtype=np.float64) / 255.0  # (H, W, 3)
    expected = (arr - np.array(cfg.mean)) / np.array(cfg.std)
    out = eval_transform(cfg)(img)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    bgr = PreprocessConfig(input_size=(3, 32, 32), mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=1.0, channel_order="BGR")
    np.testing.assert_allclose(eval_transform(bgr)(img).permute(1, 2, 0).numpy(), arr[..., ::-1], atol=1e-6)


def test_eval_transform_rejects_bad_config():
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(PreprocessConfig(crop_pct=1.5))


def test_imagenet_class_names():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[88] == "macaw" and names[285] == "Egyptian cat"
    names.append("x")  # a fresh list each call
    assert len(imagenet_class_names()) == 1000


# ------------------------------------------------------------------------------------------------ vitkit eval
def _reference_confusion(model: nn.Module, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions on ``data.name=fake``'s test split, computed independently of vitkit's eval pipeline: FakeData
    test images are already 16×16, so the transform is only (x / 255 - 0.5) / 0.5 (the ViT family's mean/std)."""
    from sklearn.metrics import confusion_matrix
    ds = FakeData(n, 10, 16, seed=1)  # what build_splits makes for name=fake, test_limit=n
    x = torch.stack([ds[i][0] for i in range(n)]).float() / 255.0  # (n, 3, 16, 16)
    with torch.no_grad():
        preds = model((x - 0.5) / 0.5).argmax(1).numpy()
    labels = np.array(ds.targets)
    return confusion_matrix(labels, preds, labels=list(range(10))), preds == labels


def test_eval_cli_on_saved_model(tmp_path, capsys):
    model = tiny_model()
    vitkit.save_pretrained(model, tmp_path / "model")
    out = tmp_path / "out"
    rc = main(["eval", str(tmp_path / "model"), "--set", "data.name=fake", "data.test_limit=40",
               "data.num_workers=0", "--out", str(out), "--batch-size", "16"])
    assert rc == 0
    expected, correct = _reference_confusion(model, 40)
    assert (expected.sum(0) > 0).sum() >= 5  # the reference is not degenerate: many classes get predicted
    rows = list(csv.reader((out / "confusion_matrix.csv").open()))
    assert np.array([[int(v) for v in r[1:]] for r in rows[1:]]).tolist() == expected.tolist()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(correct.mean())
    assert metrics["num_samples"] == 40 and metrics["split"] == "test" and metrics["data"]["name"] == "fake"
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert f"top-1 {100 * correct.mean():.2f}%" in capsys.readouterr().out


def _make_run(root, best_seed: int = 0, last_seed: int = 1):
    run = root / "runs" / "r1"
    vitkit.save_pretrained(tiny_model(best_seed), run / "checkpoints" / "best")
    vitkit.save_pretrained(tiny_model(last_seed), run / "checkpoints" / "last")
    data = {"name": "fake", "img_size": 16, "test_limit": 24, "num_workers": 0, "val_fraction": 0.25,
            "train_limit": 32}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "vit_tiny_patch16_224"}, "data": data}))
    return run


def test_eval_cli_on_run_folder_uses_best_and_run_data(tmp_path):
    run = _make_run(tmp_path)
    assert main(["eval", str(run)]) == 0
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    expected, correct = _reference_confusion(tiny_model(0), 24)  # best, not last
    assert metrics["num_samples"] == 24 and metrics["top1"] == pytest.approx(correct.mean())
    assert metrics["checkpoint"].endswith("best")
    # the val split is carved from the run's (limited) training set: 25% of 32
    assert main(["eval", str(run), "--split", "val", "--out", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "metrics.json").read_text())["num_samples"] == 8


def test_eval_cli_falls_back_to_last(tmp_path):
    run = _make_run(tmp_path)
    for f in (run / "checkpoints" / "best").iterdir():
        f.unlink()
    (run / "checkpoints" / "best").rmdir()
    assert main(["eval", str(run), "--out", str(tmp_path / "o")]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["checkpoint"].endswith("last")
    _, correct = _reference_confusion(tiny_model(1), 24)
    assert metrics["top1"] == pytest.approx(correct.mean())


def test_eval_cli_model_and_pretrained(tmp_path):
    vitkit.save_pretrained(tiny_model(), tmp_path / "m")
    rc = main(["eval", "--model", "vit_tiny_patch16_224", "--pretrained", str(tmp_path / "m"),
               "--set", "data.name=fake", "data.test_limit=8", "data.num_workers=0", "--out", str(tmp_path / "o")])
    assert rc == 0 and json.loads((tmp_path / "o" / "metrics.json").read_text())["num_samples"] == 8


def test_eval_cli_user_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but never into the repository
    vitkit.save_pretrained(tiny_model(), tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--set", "data.bogus=1"]) == 2
    assert "data.bogus" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m"), "--set", "data.name=digits", "data.img_size=32"]) == 2  # 16 px model
    assert "img_size" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m"), "--set", "data.name=fake", "data.val_fraction=0",
                 "--split", "val"]) == 2
    assert "no val split" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert main(["eval", str(tmp_path / "m"), "--pretrained", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "eval").exists()


def test_build_eval_loader_splits():
    from vitkit.evaluate.eval_data import build_eval_loader
    model = tiny_model()
    cfg = resolve_data_config(model, None, None, ["data.name=fake", "data.train_limit=20", "data.test_limit=6",
                                                  "data.val_fraction=0.25", "data.num_workers=0"])
    sizes = {}
    for split in ("train", "val", "test"):
        loader, classes = build_eval_loader(cfg, model, split, batch_size=4)
        images, labels = next(iter(loader))
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16) and len(classes) == 10
        sizes[split] = len(loader.dataset)
    assert sizes == {"train": 15, "val": 5, "test": 6}


def test_data_config_layering(tmp_path):
    model = tiny_model()
    model.data_cfg = dataclasses.replace(model.data_cfg, crop_pct=0.9, interpolation="bilinear")
    assert resolve_data_config(model, None, None, ["data.name=fake"]) == DataConfig(
        name="fake", img_size=16, interpolation="bilinear", crop_pct=0.9)  # defaults from the model's data_cfg
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"name": "digits", "crop_pct": 0.5}}))
    cfg = resolve_data_config(model, {"name": "fake", "test_limit": 3}, recipe, ["data.crop_pct=0.75"])
    assert cfg == DataConfig(name="digits", img_size=16, interpolation="bilinear", crop_pct=0.75, test_limit=3)


def test_top1_agreement_with_a_reference_model():
    """evaluate(reference=...) counts the images on which both models give the same top-1 class (what `vitkit eval
    --runtime onnxruntime --int8` reports against eager PyTorch), computed here by hand."""
    from vitkit.evaluate.metrics import evaluate
    torch.manual_seed(0)
    images, labels = torch.randn(40, 3, 8, 8), torch.randint(0, 4, (40,))
    loader = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, 40, 16)]

    class Linear(torch.nn.Module):
        num_classes = 4

        def __init__(self, seed):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 4)
            torch.nn.init.normal_(self.fc.weight, generator=torch.Generator().manual_seed(seed))

        def forward(self, x):
            return self.fc(x.flatten(1))

    a, b = Linear(1), Linear(2)
    with torch.no_grad():
        expected = (a(images).argmax(-1) == b(images).argmax(-1)).float().mean().item()
    assert 0 < expected < 1
    assert evaluate(a, loader, reference=b, progress=False).extra["top1_agreement"] == pytest.approx(expected)
    assert evaluate(a, loader, reference=a, progress=False).extra["top1_agreement"] == 1.0
    assert "top1_agreement" not in evaluate(a, loader, progress=False).extra
