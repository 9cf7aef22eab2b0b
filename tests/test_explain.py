"""`vitkit explain`: every method against an independent computation on tiny models, every family on its tiny
configuration, the report in a real browser, and the explanations' faithfulness on the real DeiT-Tiny."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import vitkit
from vitkit.cli.main import main
from vitkit.explain import explain
from vitkit.explain.faithfulness import deletion_curve, randomisation_check, spearman
from vitkit.explain.figure7 import figure7, mean_attention_distance, patch_filter_components

from conftest import REPO, randomize_, skip_or_fail

FAMILIES = vitkit.registry.list_families()
FIRST = {f: next(n for n in vitkit.list_models() if vitkit.get_spec(n).family == f) for f in FAMILIES}


def _tiny(name="vit_tiny_patch16_224", **kw):
    return randomize_(vitkit.create_model(name, **{**vitkit.get_spec(name).tiny, **kw})).eval()


def _x(model, batch=2, seed=0):
    return torch.randn(batch, *model.data_cfg.input_size, generator=torch.Generator().manual_seed(seed))


def _manual_forward(model, x):
    """Independent of vitkit.explain and of the model's attention code: a ViT forward written out from its weights,
    returning the logits and each block's attention probabilities (B, heads, N, N), which the logits depend on."""
    attn, tokens = [], model.embed(x)
    for blk in model.blocks:
        h = blk.norm1(tokens)
        B, N, C = h.shape
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        A = ((q @ k.transpose(-1, -2)) * (C // heads) ** -0.5).softmax(-1)
        attn.append(A)
        tokens = tokens + blk.attn.proj((A @ v).transpose(1, 2).reshape(B, N, C))
        tokens = tokens + blk.mlp(blk.norm2(tokens))
    return model.forward_head(model.norm(tokens)), attn


def _attn_stack(model, x):
    with torch.no_grad():
        return _manual_forward(model, x)[1]


# ------------------------------------------------------------------------------------- methods vs brute force
def test_attention_maps_are_the_class_token_rows():
    model = _tiny(depth=2, img_size=64)
    x = _x(model)
    exp = explain(model, x, "attention")
    with torch.no_grad():
        attn = _attn_stack(model, x)
    for i, layer in enumerate(exp.layers):
        row = attn[i][:, :, 0, 1:].reshape(2, -1, 4, 4)  # (B, heads, 4, 4) patches the class token attends to
        expected = row / row.flatten(2).amax(-1)[..., None, None]
        torch.testing.assert_close(exp.layers[layer], expected, atol=1e-5, rtol=0)


def test_rollout_matches_abnar_and_zuidema():
    model = _tiny(depth=3, img_size=64)
    x = _x(model)
    with torch.no_grad():
        attn = _attn_stack(model, x)
    N = attn[0].shape[-1]
    R = torch.eye(N).repeat(2, 1, 1)
    for A in attn:  # Â = 0.5·mean_h A + 0.5·I, rows renormalised; R = Â_L … Â_1
        A = 0.5 * A.mean(1) + 0.5 * torch.eye(N)
        R = (A / A.sum(-1, keepdim=True)) @ R
    expected = R[:, 0, 1:].reshape(2, 4, 4)
    expected = expected / expected.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(explain(model, x, "rollout").heatmap, expected, atol=1e-5, rtol=0)


def test_relevance_matches_chefer_et_al():
    model = _tiny(depth=2, img_size=64)
    x = _x(model, batch=1)
    logits, attn = _manual_forward(model, x)
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=0)
    target = int(logits.argmax())
    grads = torch.autograd.grad(logits[0, target], attn)
    N = attn[0].shape[-1]
    R = torch.eye(N)
    for A, G in zip(attn, grads):
        R = R + (G * A).clamp(min=0).mean(1)[0] @ R
    expected = (R[0] - torch.eye(N)[0])[1:].reshape(4, 4).detach().clamp(min=0)
    expected = expected / expected.max()
    torch.testing.assert_close(explain(model, x, "relevance").heatmap[0], expected, atol=1e-5, rtol=0)


def test_gradcam_on_the_last_attention_input():
    model = _tiny(depth=2, img_size=64)
    x = _x(model, batch=1)
    tokens = model.embed(x)
    tokens = model.blocks[0](tokens)
    h = model.blocks[1].norm1(tokens).detach().requires_grad_(True)  # what the last attention layer reads
    blk = model.blocks[1]
    z = tokens + blk.attn(h)
    z = z + blk.mlp(blk.norm2(z))
    logits = model.forward_head(model.norm(z))
    target = int(logits.argmax())
    (g,) = torch.autograd.grad(logits[0, target], h)
    fmap, grad = h[0, 1:].detach().t().reshape(-1, 4, 4), g[0, 1:].t().reshape(-1, 4, 4)
    cam = (grad.mean((1, 2), keepdim=True) * fmap).sum(0).clamp(min=0)
    torch.testing.assert_close(explain(model, x, "gradcam").heatmap[0], cam / cam.max(), atol=1e-5, rtol=0)


def test_spearman_against_hand_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.9487, abs=1e-4)


def test_patch_filter_components_recover_a_planted_basis():
    """Filters that are mixtures of two orthogonal patterns have exactly two non-zero principal components."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(3 * 4 * 4, 2, generator=g)).Q.t()  # (2, 48) orthonormal
    coeff = torch.randn(64, 2, generator=g) * torch.tensor([3.0, 1.0])
    filters = (coeff @ basis).reshape(64, 3, 4, 4)
    comps, explained = patch_filter_components(filters, k=4)
    assert explained[0] + explained[1] == pytest.approx(1.0, abs=1e-6) and explained[0] > explained[1]


# ------------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_explains(family):
    model = _tiny(FIRST[family])
    x = _x(model, batch=1)
    methods = ["attention", "gradcam"] + (["rollout", "relevance"] if model.intermediates == "tokens" else [])
    for method in methods:
        exp = explain(model, x, method)
        assert exp.heatmap.ndim == 3 and exp.heatmap.shape[0] == 1, method
        assert torch.isfinite(exp.heatmap).all() and exp.heatmap.min() >= 0 and exp.heatmap.max() <= 1, method
    assert explain(model, x, "attention").layers, "attention maps of at least one layer are placed on the image"


def test_hierarchical_models_refuse_token_methods_by_name(capsys, tmp_path):
    pyramids = [f for f in FAMILIES if vitkit.get_spec(FIRST[f]).model_cls.intermediates == "pyramid"]
    if not pyramids:
        pytest.skip("no hierarchical family registered yet")
    model = _tiny(FIRST[pyramids[0]])
    with pytest.raises(ValueError, match="no token read-out"):
        explain(model, _x(model, 1), "rollout")


def test_dat_sampling_points_are_drawn_where_the_layers_sample():
    """Each deformable layer's sampled points (from the recorded attention info, in input pixels) are drawn as red dots
    on the photo, one picture per layer; models without deformable layers get none."""
    import numpy as np
    from vitkit.explain.pipeline import explain_image
    model = _tiny("dat_tiny")
    x = _x(model, batch=1)[0]
    item, images = explain_image(model, x, ["attention"], None, [str(i) for i in range(model.num_classes)], "x")
    _, points = model.deformable_points(x[None])
    deformable = [n for n, m in model.named_modules() if type(m).__name__ == "DeformableAttention"]
    assert deformable and sorted(points) == sorted(deformable)
    assert sorted(item.extra) == sorted(f"sampling points {n}" for n in deformable)
    H, W = x.shape[-2:]
    for layer, p in points.items():
        drawn = np.asarray(images[f"points_{layer.replace('.', '_')}"]).astype(int)
        red = (drawn[..., 0] > 200) & (drawn[..., 1] < 90) & (drawn[..., 2] < 90)
        for px, py in p["pixels"][0].reshape(-1, 2).tolist():
            if 2 <= px < W - 2 and 2 <= py < H - 2:
                assert red[round(py), round(px)], (layer, px, py)
    plain, _ = explain_image(_tiny(), _x(_tiny(), 1)[0], ["attention"], None, [str(i) for i in range(1000)], "x")
    assert plain.extra == {}


# ------------------------------------------------------------------------------------------ CLI and report
def test_cli_writes_overlays_and_a_report(tmp_path, capsys):
    from PIL import Image
    model = _tiny("deit_tiny_distilled_patch16_224")
    vitkit.save_pretrained(model, tmp_path / "m")
    for i in range(2):
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(tmp_path / f"img{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code = main(["explain", str(tmp_path / "img0.png"), str(tmp_path / "img1.png"), str(tmp_path / "bad.png"),
                 "--pretrained", str(tmp_path / "m"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "wrote 8 overlays" in out and "bad.png: error" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("img0_*.png")) == [
        "img0_attention.png", "img0_gradcam.png", "img0_relevance.png", "img0_rollout.png"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 8 and "blocks.0.attn" in html and "http" not in html.split("<body")[1]
    assert main(["explain", str(tmp_path / "img0.png"), "--pretrained", str(tmp_path / "m"), "--method", "sharp"]) == 2


def test_cli_figure7_and_faithfulness(tmp_path, capsys):
    import json

    from PIL import Image
    model = _tiny("deit_tiny_patch16_224")
    vitkit.save_pretrained(model, tmp_path / "m")
    for i in range(2):
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(tmp_path / f"img{i}.png")
    code = main(["explain", str(tmp_path / "img0.png"), str(tmp_path / "img1.png"), "--pretrained",
                 str(tmp_path / "m"), "--out", str(tmp_path / "out"), "--method", "attention,gradcam", "--figure7",
                 "--faithfulness"])
    out = capsys.readouterr().out
    layers = model.cfg.depth
    assert code == 0 and (tmp_path / "out" / "figure7.png").stat().st_size > 1000
    assert sum(line.strip().startswith("layer ") for line in out.splitlines()) == layers
    rows = json.loads((tmp_path / "out" / "faithfulness.json").read_text())
    assert sorted(rows) == ["attention", "gradcam"]
    for row in rows.values():
        assert len(row["spearman"]) == 2 and -1 <= row["spearman_mean"] <= 1
        assert row["fractions"][0] == 0 and row["fractions"][-1] == 1 and 0 <= row["deletion_auc"] <= 1


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_a_headless_browser(tmp_path):
    """The page, opened by Chromium itself, is a page of pictures: the screenshot is not blank."""
    import numpy as np
    from PIL import Image
    browser = _chromium()
    if browser is None:
        skip_or_fail("Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    model = _tiny("vit_tiny_patch16_224", img_size=64)
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(tmp_path / "img.png")
    assert main(["explain", str(tmp_path / "img.png"), "--pretrained", str(_saved(model, tmp_path)),
                 "--out", str(tmp_path / "out")]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900", f"--screenshot={shot}",
                    (tmp_path / "out" / "report.html").as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.std() > 20  # not an empty page
    saturated = ((pixels.max(-1) - pixels.min(-1)) > 60).mean()
    assert saturated > 0.01  # the heat-map colours are on screen


def _saved(model, tmp_path):
    vitkit.save_pretrained(model, tmp_path / "saved")
    return tmp_path / "saved"


# --------------------------------------------------------------------------------- the real DeiT-Tiny
WEIGHTS = REPO.parent / "shared" / "weights" / "deit_tiny_patch16_224_in1k_fp16.safetensors"
PHOTOS = REPO.parent / "shared" / "data" / "images"


@pytest.fixture(scope="module")
def deit_and_photos():
    if not WEIGHTS.is_file() or not PHOTOS.is_dir():
        skip_or_fail(f"needs {WEIGHTS} and {PHOTOS}")
    from vitkit.evaluate.predict import expand_inputs, load_batch
    from vitkit.evaluate.preprocess import eval_transform
    model = vitkit.create_model("deit_tiny_patch16_224", pretrained=str(WEIGHTS)).eval()
    tensors, _ = load_batch(expand_inputs([PHOTOS])[:6], eval_transform(model.data_cfg))
    return model, torch.stack(tensors)


@pytest.mark.parametrize("method", ["attention", "rollout", "relevance", "gradcam"])
def test_maps_fail_the_model_randomisation_sanity_check(deit_and_photos, method):
    """Adebayo et al. 2018: maps of the trained model and of a randomised copy differ materially (rank correlation
    well below 1; measured: |mean| < 0.2 for every method on these photos, see README)."""
    model, images = deit_and_photos
    rho = randomisation_check(model, images[:4], method)
    assert sum(rho) / len(rho) < 0.5, rho


@pytest.mark.parametrize("method", ["attention", "rollout", "relevance", "gradcam"])
def test_deletion_removes_evidence_faster_than_random(deit_and_photos, method):
    model, images = deit_and_photos
    result = deletion_curve(model, images[:4], method, steps=6, random_orders=2)
    assert result.method_auc < result.random_auc, (result.method_auc, result.random_auc)


def test_figure7_attention_distance_grows_with_depth(deit_and_photos):
    model, images = deit_and_photos
    dist = mean_attention_distance(model, images)  # (layers, heads) pixels
    assert dist.shape == (12, 3)
    assert dist[-3:].mean() > 1.3 * dist[:3].mean()  # deeper layers attend farther (the paper's Figure 7, right)
    assert dist[:2].max() > 2 * dist[:2].min()  # low layers mix local and far-reaching heads
    fig = figure7(model, images[:2])
    assert fig.components.shape == (28, 3, 16, 16) and fig.similarity.shape == (14, 14, 14, 14)
    assert fig.similarity[7, 7].argmax() == 7 * 14 + 7  # a position is most similar to itself
