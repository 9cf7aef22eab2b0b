"""vitkit.evaluate.predict and `vitkit predict` on generated images with a tiny model (fast, offline)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vitkit
from vitkit.cli.main import main
from vitkit.evaluate import expand_inputs, predict_files, resolve_class_names

TINY = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=7, global_pool="avg",
            class_token=False)
NAMES = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date"]


def tiny_model(seed: int = 0) -> nn.Module:
    """Tiny ViT with large head weights so probabilities differ clearly between images; crop_pct 1 so a 16×16
    image reaches the model unresized."""
    torch.manual_seed(seed)
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY).eval()
    nn.init.normal_(model.head.weight, std=3.0)
    model.data_cfg = dataclasses.replace(model.data_cfg, crop_pct=1.0)
    return model


def _pixels(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def images(tmp_path):
    """Three readable images (PNG, JPEG, greyscale PNG in a sub-folder) and a corrupt one."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(_pixels(0)).save(folder / "a.png")
    Image.fromarray(_pixels(1, 40)).save(folder / "b.JPG", quality=95)
    Image.fromarray(_pixels(2)[..., 0]).save(folder / "sub" / "c.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    return folder


def _reference_probs(model: nn.Module, pixels: np.ndarray) -> torch.Tensor:
    """Softmax for a 16×16 RGB array, preprocessed by hand: (x / 255 - 0.5) / 0.5, the ViT family's mean/std."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0  # (3, 16, 16)
    with torch.no_grad():
        return model(((x - 0.5) / 0.5)[None]).softmax(-1)[0]


def test_expand_inputs(images):
    found = expand_inputs([images, images / "notes.txt", images / "missing.png"])
    names = [p.replace(str(images), "") for p in found]
    # folder: recursive, sorted, extensions case-insensitive, hidden files skipped, .txt skipped;
    # explicitly named files are kept whatever they are, so they get an error row
    assert names == ["/a.png", "/b.JPG", "/broken.png", "/sub/c.png", "/notes.txt", "/missing.png"]


def test_predictions_match_hand_preprocessing(images):
    model = tiny_model()
    preds = predict_files(model, [images / "a.png", images / "sub" / "c.png"], topk=3)
    grey = np.repeat(_pixels(2)[..., :1], 3, axis=-1)  # an L image becomes R = G = B
    for pred, pixels in zip(preds, (_pixels(0), grey)):
        ref = _reference_probs(model, pixels)
        values, indices = ref.topk(3)
        assert pred.error is None
        assert [i for i, _, _ in pred.topk] == indices.tolist()
        np.testing.assert_allclose([p for _, _, p in pred.topk], values.numpy(), rtol=1e-5)
        assert [n for _, n, _ in pred.topk] == [f"class_{i}" for i in indices.tolist()]
    assert preds[0].topk[0][0] != preds[1].topk[0][0] or preds[0].topk[0][2] != pytest.approx(preds[1].topk[0][2])


def test_corrupt_file_does_not_stop_others(images):
    model = tiny_model()
    paths = [images / "a.png", images / "broken.png", images / "missing.png", images / "b.JPG"]
    preds = predict_files(model, paths, topk=2, batch_size=2)
    assert [p.path for p in preds] == [str(p) for p in paths]
    assert [p.ok for p in preds] == [True, False, False, True]
    assert "cannot identify image" in preds[1].error and preds[1].topk == []
    assert "No such file" in preds[2].error or "not found" in preds[2].error.lower()
    alone = predict_files(model, [images / "b.JPG"], topk=2)[0]
    assert [i for i, _, _ in alone.topk] == [i for i, _, _ in preds[3].topk]
    np.testing.assert_allclose([p for *_, p in alone.topk], [p for *_, p in preds[3].topk], rtol=1e-5)


def test_truncated_image_is_an_error(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_pixels(3, 64)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    pred = predict_files(tiny_model(), [tmp_path / "cut.jpg"])[0]
    assert pred.error and "truncated" in pred.error.lower()


def test_batch_size_does_not_change_results(images):
    model = tiny_model()
    one = predict_files(model, [images], topk=7, batch_size=1)
    many = predict_files(model, [images], topk=7, batch_size=16)
    for a, b in zip(one, many):
        assert a.error == b.error
        np.testing.assert_allclose([p for *_, p in a.topk], [p for *_, p in b.topk], rtol=1e-5, atol=1e-7)


def test_class_names_resolution():
    model = tiny_model()
    assert resolve_class_names(model) == [f"class_{i}" for i in range(7)]
    model.class_names = NAMES
    assert resolve_class_names(model) == NAMES
    model.class_names = NAMES[:3]  # wrong length: ignored
    assert resolve_class_names(model)[0] == "class_0"
    big = vitkit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=1)
    assert big.num_classes == 1000 and resolve_class_names(big)[88] == "macaw"
    big.data_cfg = dataclasses.replace(big.data_cfg, label_set=None)
    assert resolve_class_names(big)[88] == "class_88"


def test_saved_class_names_round_trip_through_cli(images, tmp_path, capsys):
    model = tiny_model()
    vitkit.save_pretrained(model, tmp_path / "saved", class_names=NAMES)
    rc = main(["predict", str(images / "a.png"), "--pretrained", str(tmp_path / "saved"), "--format", "json",
               "--topk", "7"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)
    ref = _reference_probs(model, _pixels(0))  # the saved data_cfg (crop_pct 1) came back too
    assert [t["label"] for t in row["topk"]] == [NAMES[i] for i in ref.argsort(descending=True).tolist()]
    np.testing.assert_allclose([t["prob"] for t in row["topk"]], ref.sort(descending=True).values, rtol=1e-5)
    assert [t["rank"] for t in row["topk"]] == list(range(1, 8)) and row["error"] is None


def test_cli_csv_and_table(images, tmp_path, capsys):
    vitkit.save_pretrained(tiny_model(), tmp_path / "saved", class_names=NAMES)
    assert main(["predict", str(images), "--pretrained", str(tmp_path / "saved"), "--format", "csv",
                 "--topk", "2", "--batch-size", "3"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 * 2 + 1  # three images × top-2, one error row
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png") and bad[0]["rank"] == ""
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in NAMES and 0.0 < float(r["probability"]) <= 1.0 for r in good)
    assert [r["rank"] for r in good] == ["1", "2"] * 3

    assert main(["predict", str(images / "a.png"), str(images / "broken.png"), "--pretrained",
                 str(tmp_path / "saved"), "--topk", "3"]) == 0
    blocks = capsys.readouterr().out.strip().split("\n\n")
    assert blocks[0].splitlines()[0].endswith("a.png") and len(blocks[0].splitlines()) == 4
    rank, prob, name = blocks[0].splitlines()[1].split()[:3]
    assert rank == "1" and 0 < float(prob) <= 1 and name in NAMES
    assert blocks[1].splitlines()[1].strip().startswith("error:")


def test_cli_exit_code_when_nothing_readable(images, tmp_path, capsys):
    vitkit.save_pretrained(tiny_model(), tmp_path / "saved")
    assert main(["predict", str(images / "broken.png"), "--pretrained", str(tmp_path / "saved")]) == 1
    assert "error:" in capsys.readouterr().out


def test_cli_run_folder_and_model_name(images, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    vitkit.save_pretrained(tiny_model(0), run / "checkpoints" / "best", class_names=NAMES)
    vitkit.save_pretrained(tiny_model(1), run / "checkpoints" / "last", class_names=NAMES)
    assert main(["predict", str(images / "a.png"), "--pretrained", str(run), "--format", "json"]) == 0
    from_run = json.loads(capsys.readouterr().out)[0]["topk"]
    ref = _reference_probs(tiny_model(0), _pixels(0))
    assert from_run[0]["index"] == int(ref.argmax()) and from_run[0]["prob"] == pytest.approx(float(ref.max()))
    # --model with a vitkit folder goes through create_model(name, pretrained=folder)
    assert main(["predict", str(images / "a.png"), "--model", "vit_tiny_patch16_224", "--pretrained",
                 str(run / "checkpoints" / "best"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["topk"] == from_run


def test_cli_user_errors(images, tmp_path, capsys):
    assert main(["predict", str(images / "a.png")]) == 2  # no model at all
    assert "--model" in capsys.readouterr().err
    (tmp_path / "w.safetensors").write_bytes(b"x" * 16)
    assert main(["predict", str(images / "a.png"), "--pretrained", str(tmp_path / "w.safetensors")]) == 2
    assert "--model NAME" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--model", "vit_tiny_patch16_224"]) == 2
    assert "no image files" in capsys.readouterr().err
