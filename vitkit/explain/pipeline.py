"""From image files to overlays and a report: load and preprocess each image as the model's data config says, run
the chosen methods one image at a time (memory stays flat; relevance needs gradients), write a PNG overlay per image
and method and one HTML report."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from vitkit.evaluate.labels import resolve_class_names
from vitkit.families.contract import FamilyModel
from vitkit.evaluate.predict import load_batch
from vitkit.evaluate.preprocess import eval_transform
from vitkit.explain.methods import explain, upsample
from vitkit.explain.render import denormalize, draw_points, overlay, to_data_uri
from vitkit.explain.html_page import ImageReport, heat_png, write_report

__all__ = ["explain_files", "explain_image", "load_images", "sampling_points"]


def explain_image(model: nn.Module, x: torch.Tensor, methods: Sequence[str], target: int | None,
                  names: Sequence[str], name: str) -> tuple[ImageReport, dict[str, "object"]]:
    """Explain one preprocessed image (3, H, W): the report entry and the overlays (method → PIL image)."""
    batch = x[None]
    H, W = x.shape[-2:]
    photo = denormalize(x, model.data_cfg)
    with torch.no_grad():
        probs = model(batch).float().softmax(-1)[0]
    cls = int(probs.argmax()) if target is None else target
    item = ImageReport(name, f"{names[cls]} ({probs[cls]:.2f})", to_data_uri(overlay(photo, torch.zeros(H, W))))
    images = {}
    for method in methods:
        exp = explain(model, batch, method, target)
        images[method] = overlay(photo, upsample(exp.heatmap, (H, W))[0])
        item.overlays[method] = to_data_uri(images[method])
        if method == "attention":
            for layer, maps in exp.layers.items():  # (1, heads, h, w)
                heads = [heat_png(m.numpy()) for m in maps[0]]
                item.attention[layer] = heads + [heat_png(maps[0].mean(0).numpy())]
    for layer, image in sampling_points(model, batch, photo).items():
        images[f"points_{layer.replace('.', '_')}"] = image
        item.extra[f"sampling points {layer}"] = to_data_uri(image)
    return item, images


def sampling_points(model: FamilyModel, batch: torch.Tensor, photo) -> dict[str, "object"]:
    """Layers that sample their keys at learned positions (``FamilyModel.sampling_points``): per layer, the photo
    with every group's sampling points (red dots) and their reference points (white squares) drawn in input pixels;
    empty for other models."""
    with torch.no_grad():
        points = model.sampling_points(batch)
    return {layer: draw_points(photo, p["pixels"][0].reshape(-1, 2).numpy(),  # (groups·Hk·Wk, 2) of image 0
                               p["reference_pixels"][0].reshape(-1, 2).numpy())
            for layer, p in points.items()}


def load_images(model: nn.Module, files: Sequence[str]) -> torch.Tensor:
    """(N, 3, H, W): the readable ``files`` preprocessed as the model's data config says."""
    tensors, _ = load_batch(list(files), eval_transform(model.data_cfg))
    return torch.stack([t for t in tensors if t is not None])


def explain_files(model: nn.Module, files: Sequence[str], methods: Sequence[str], out: str,
                  target: int | None = None) -> tuple[str, list[str], list[tuple[str, str]]]:
    """Write ``out/<stem>_<method>.png`` for every readable image and method, and ``out/report.html``.
    Returns (report path, written PNG paths, [(unreadable path, error)])."""
    transform = eval_transform(model.data_cfg)
    names = resolve_class_names(model)
    items, written, failed = [], [], []
    for path in files:
        tensors, errors = load_batch([path], transform)
        if errors[0] is not None:
            failed.append((path, errors[0]))
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        item, images = explain_image(model, tensors[0], methods, target, names, os.path.basename(path))
        for method, image in images.items():
            png = os.path.join(out, f"{stem}_{method}.png")
            image.save(png)
            written.append(png)
        items.append(item)
    title = f"vitkit explain: {model.variant_name or type(model).__name__}"
    report = write_report(os.path.join(out, "report.html"), title, items,
                          [f"methods: {', '.join(methods)}", f"{len(items)} image(s)"])
    return report, written, failed
