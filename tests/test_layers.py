"""Shared layers checked against formulas and independent computations (hand-computed values, PIL, written-out
kernels), not against themselves."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitkit
from vitkit.config import ConfigError
from vitkit.layers import Attention, DropPath, Mlp, drop_path, drop_path_rates, make_act, resample_pos_embed
from vitkit.layers.attention import attend

from conftest import randomize_, tiny_overrides


class _AtenOps(TorchDispatchMode):
    """Records the names of the aten ops that run (to tell the fused kernel from the explicit softmax path)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    @property
    def fused(self) -> bool:
        return any("scaled_dot_product" in n for n in self.names)

    @property
    def softmax(self) -> bool:
        return any(n.endswith("_softmax") for n in self.names)


# ------------------------------------------------------------------------------------------------------ attention
def _qkv(B=2, h=3, N=7, M=7, d=8):
    return torch.randn(B, h, N, d), torch.randn(B, h, M, d), torch.randn(B, h, M, d)


def _reference_attention(q, k, v, scale, bias=None):
    """softmax(q kᵀ · scale + bias) v written out with einsum (Vaswani et al. eq. 1)."""
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if bias is not None:
        logits = logits + bias
    p = torch.exp(logits - logits.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return torch.einsum("bhnm,bhmd->bhnd", p, v), p


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "additive-bias"])
def test_fused_and_recording_attention_agree(with_bias):
    q, k, v = _qkv(M=9)
    bias = torch.randn(1, 3, 7, 9) if with_bias else None  # broadcasts over the batch, like a relative-position bias
    scale = 8 ** -0.5
    recorded = []
    fused = attend(q, k, v, scale=scale, bias=bias)
    explicit = attend(q, k, v, scale=scale, bias=bias, record=recorded.append)
    ref_out, ref_p = _reference_attention(q, k, v, scale, bias)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    torch.testing.assert_close(explicit, ref_out, atol=1e-5, rtol=0)
    assert len(recorded) == 1
    torch.testing.assert_close(recorded[0], ref_p, atol=1e-6, rtol=0)


def test_attention_module_matches_per_head_formula():
    """The fused qkv projection is split (q, k, v) × heads in timm's order; check against a per-head loop."""
    attn = Attention(dim=12, num_heads=3).eval()
    randomize_(attn)
    x = torch.randn(2, 5, 12)
    W, b = attn.qkv.weight, attn.qkv.bias
    heads = []
    for i in range(3):
        sl = slice(4 * i, 4 * i + 4)
        q = x @ W[0:12][sl].T + b[0:12][sl]
        k = x @ W[12:24][sl].T + b[12:24][sl]
        v = x @ W[24:36][sl].T + b[24:36][sl]
        heads.append(torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v)  # head_dim 4 → scale 1/2
    ref = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=0)


def test_record_attention_probabilities_and_context_exit():
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_overrides("vit_tiny_patch16_224", depth=2)).eval()
    randomize_(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with _AtenOps() as ops_before:
            out_fused = model(x)
        with vitkit.record_attention(model) as maps:
            with _AtenOps() as ops_inside:
                out_recorded = model(x)
        with _AtenOps() as ops_after:
            out_after = model(x)
    assert ops_before.fused and not ops_before.softmax
    assert ops_inside.softmax and not ops_inside.fused
    assert ops_after.fused and not ops_after.softmax, "closing the context must switch the fused kernel back on"
    torch.testing.assert_close(out_fused, out_recorded, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_fused, out_after, atol=0, rtol=0)

    assert sorted(maps) == ["blocks.0.attn", "blocks.1.attn"]
    N = 1 + 2 * 2  # class token + 2x2 patches
    for name, p in maps.items():
        assert p.shape == (2, 3, N, N), name
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, N), atol=1e-6, rtol=0)
        assert not p.requires_grad
    # the recorded map is the softmax of block 0's scaled q·k of its normed input
    blk = model.blocks[0]
    tokens = model.embed(x)
    qkv = blk.attn.qkv(blk.norm1(tokens)).reshape(2, N, 3, 3, 16).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * 16 ** -0.5, dim=-1)
    torch.testing.assert_close(maps["blocks.0.attn"], ref.detach(), atol=1e-5, rtol=0)

    before = {k: v.clone() for k, v in maps.items()}
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(before[k], maps[k]) for k in maps), "nothing may be recorded after the context closed"
    assert all(m.attn_recorder is None for m in model.modules() if hasattr(m, "attn_recorder"))


def test_record_attention_is_restored_after_an_exception():
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_overrides("vit_tiny_patch16_224")).eval()
    with pytest.raises(RuntimeError, match="boom"):
        with vitkit.record_attention(model):
            raise RuntimeError("boom")
    assert model.blocks[0].attn.attn_recorder is None


def test_nested_record_attention_keeps_the_outer_recorder():
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_overrides("vit_tiny_patch16_224", depth=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), vitkit.record_attention(model) as outer:
        with vitkit.record_attention(model) as inner:
            model(x)
        assert sorted(inner) == ["blocks.0.attn"]
        outer.clear()
        model(x)
        assert sorted(outer) == ["blocks.0.attn"]


# ---------------------------------------------------------------------------------------------- position embedding
def _posemb(grid: np.ndarray, prefix: np.ndarray) -> torch.Tensor:
    """(h, w, D) grid + (P, D) prefix rows → (1, P + h·w, D) in row-major patch order."""
    h, w, D = grid.shape
    return torch.tensor(np.concatenate([prefix, grid.reshape(h * w, D)]), dtype=torch.float32)[None]


def test_resample_identity_at_same_size():
    pos = torch.randn(1, 2 + 3 * 5, 8)
    out = resample_pos_embed(pos, (3, 5), (3, 5), num_prefix_tokens=2)
    assert torch.equal(out, pos)
    out[0, 0, 0] += 1  # a new tensor: the input is never modified
    assert not torch.equal(out, pos)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_resample_leaves_prefix_tokens_untouched(prefix):
    pos = torch.randn(1, prefix + 4 * 4, 6)
    out = resample_pos_embed(pos, (6, 3), (4, 4), num_prefix_tokens=prefix)
    assert out.shape == (1, prefix + 18, 6)
    assert torch.equal(out[:, :prefix], pos[:, :prefix])


def test_resample_bilinear_2x2_to_4x4_by_hand():
    """align_corners=False: output pixel i samples source coordinate (i + 0.5) · 2/4 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    clamped to [0, 1] → 1-D weights (1, 0), (3/4, 1/4), (1/4, 3/4), (0, 1). For the grid [[0, 4], [8, 12]] that gives
    rows [0, 1, 3, 4], then 3/4·row0 + 1/4·row1 etc."""
    grid = np.zeros((2, 2, 2))
    grid[..., 0] = [[0, 4], [8, 12]]
    grid[..., 1] = [[-1, 1], [3, -5]]
    cls = np.array([[7.0, 7.0]])
    out = resample_pos_embed(_posemb(grid, cls), (4, 4), (2, 2), num_prefix_tokens=1, interpolation="bilinear",
                             antialias=False)
    expected0 = [[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]]
    # channel 1: columns (-1, -0.5, 0.5, 1) and (3, 1, -3, -5); rows mix them 1, 3/4:1/4, 1/4:3/4, 0:1
    r0, r1 = np.array([-1, -0.5, 0.5, 1]), np.array([3, 1, -3, -5])
    expected1 = [r0, 0.75 * r0 + 0.25 * r1, 0.25 * r0 + 0.75 * r1, r1]
    got = out[0, 1:].reshape(4, 4, 2).numpy()
    np.testing.assert_allclose(got[..., 0], expected0, atol=1e-6)
    np.testing.assert_allclose(got[..., 1], expected1, atol=1e-6)
    assert out[0, 0].tolist() == [7.0, 7.0]


def _cubic(x: float, a: float) -> float:
    """Keys' cubic convolution kernel (a = -0.75 is what PyTorch/OpenCV use without antialiasing)."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) interpolation matrix: half-pixel source coordinates, 4 taps, edge indices clamped."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(src)
        t = src - i0
        for idx, w in zip(range(i0 - 1, i0 + 3), (_cubic(t + 1, a), _cubic(t, a), _cubic(1 - t, a), _cubic(2 - t, a))):
            m[i, min(max(idx, 0), n_in - 1)] += w
    return m


def test_resample_bicubic_non_square_against_separable_kernel():
    grid = np.random.RandomState(0).randn(2, 3, 4)  # (h, w, D): a 2x3 grid
    out = resample_pos_embed(_posemb(grid, np.ones((1, 4))), (4, 6), (2, 3), num_prefix_tokens=1,
                             interpolation="bicubic", antialias=False)
    ref = np.einsum("ih,hwd,jw->ijd", _cubic_matrix(2, 4), grid, _cubic_matrix(3, 6))
    np.testing.assert_allclose(out[0, 1:].reshape(4, 6, 4).numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("old,new", [((2, 3), (4, 6)), ((2, 3), (5, 7)), ((7, 5), (3, 2))], ids=str)
def test_resample_default_bicubic_antialias_matches_pillow(old, new):
    """The default (bicubic, antialias=True, timm's convention) is PIL's bicubic filter: compare with Pillow resizing
    each channel as a float32 image."""
    from PIL import Image
    grid = np.random.RandomState(1).randn(*old, 3).astype(np.float32)
    out = resample_pos_embed(_posemb(grid, np.zeros((1, 3))), new, old, num_prefix_tokens=1)
    ref = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(grid[..., d])).resize((new[1], new[0]),
                                                                                         Image.BICUBIC))
                    for d in range(3)], axis=-1)
    np.testing.assert_allclose(out[0, 1:].reshape(*new, 3).numpy(), ref, atol=1e-5)


def _linear_matrix(n_in: int, n_out: int, corners: bool) -> np.ndarray:
    """(n_out, n_in) 2-tap linear interpolation: corner-aligned (scipy.ndimage.zoom order 1) or half-pixel centres."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1) if corners else min(max((i + 0.5) * n_in / n_out - 0.5, 0), n_in - 1)
        i0 = min(math.floor(src), n_in - 2)
        m[i, i0], m[i, i0 + 1] = 1 - (src - i0), src - i0
    return m


@pytest.mark.parametrize("old,new", [((2, 3), (4, 6)), ((4, 4), (6, 6)), ((7, 5), (3, 4))], ids=str)
def test_named_schemes_against_independent_references(old, new):
    """Each scheme of POS_EMBED_RESIZES against a reference that does not go through F.interpolate: Keys' kernel
    (bicubic), Pillow (bicubic_antialias), scipy.ndimage.zoom order 1 as vit_jax / big_vision call it (zoom_linear),
    half-pixel linear taps (bilinear), the formula (sinusoid). Prefix rows are kept by all of them."""
    import scipy.ndimage
    from PIL import Image
    from vitkit.layers.pos_embed import POS_EMBED_RESIZES, sinusoid_table
    grid = np.random.RandomState(2).randn(*old, 3).astype(np.float32)
    prefix = np.random.RandomState(3).randn(2, 3)
    pos = _posemb(grid, prefix)
    refs = {
        "bicubic": np.einsum("ih,hwd,jw->ijd", _cubic_matrix(old[0], new[0]), grid, _cubic_matrix(old[1], new[1])),
        "bicubic_antialias": np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(grid[..., d]))
                                                  .resize((new[1], new[0]), Image.BICUBIC)) for d in range(3)], -1),
        "zoom_linear": scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1),
        "bilinear": np.einsum("ih,hwd,jw->ijd", _linear_matrix(old[0], new[0], False), grid,
                              _linear_matrix(old[1], new[1], False)),
        "sinusoid": sinusoid_table(2 + new[0] * new[1], 3)[0, 2:].reshape(*new, 3).numpy(),
    }
    assert set(refs) == set(POS_EMBED_RESIZES)
    for name, scheme in POS_EMBED_RESIZES.items():
        out = scheme.fn(pos, new, old, 2)
        assert out.shape == (1, 2 + new[0] * new[1], 3) and out.dtype == pos.dtype
        if name != "sinusoid":
            assert torch.equal(out[:, :2], pos[:, :2]), name
        np.testing.assert_allclose(out[0, 2:].reshape(*new, 3).numpy(), refs[name], atol=1e-5, err_msg=name)


def test_an_unknown_scheme_names_the_choices():
    from vitkit.layers.pos_embed import get_pos_embed_resize
    with pytest.raises(ValueError, match="choose from bicubic, bicubic_antialias, zoom_linear, bilinear, sinusoid"):
        get_pos_embed_resize("lanczos")


def test_resample_rejects_inconsistent_grid():
    with pytest.raises(ValueError, match="old grid"):
        resample_pos_embed(torch.zeros(1, 1 + 10, 4), (4, 4), (3, 3))
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.zeros(1, 1 + 10, 4), (4, 4))


# ------------------------------------------------------------------------------------------------------ drop path
def test_drop_path_identity_in_eval_and_at_zero_rate():
    x = torch.randn(16, 5, 4)
    assert torch.equal(drop_path(x, 0.5, training=False), x)
    assert torch.equal(drop_path(x, 0.0, training=True), x)
    module = DropPath(0.5).eval()
    assert torch.equal(module(x), x)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    p, n = 0.3, 20000
    x = torch.ones(n, 3, 2)
    y = drop_path(x, p, training=True)
    per_sample = y.reshape(n, -1)
    # each sample is dropped (all zeros) or kept and scaled by 1 / (1 - p) as a whole
    kept = per_sample[:, 0] != 0
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / (1 - p)))
    assert torch.all(per_sample[~kept] == 0)
    assert abs((~kept).float().mean().item() - p) < 0.02
    assert abs(y.mean().item() - 1.0) < 0.03  # E[drop_path(x)] = x; sd of the mean ≈ 0.005


def test_drop_path_rates_linear_from_zero():
    assert drop_path_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert drop_path_rates(0.3, 1) == [0.0]
    blocks = vitkit.create_model("vit_tiny_patch16_224", depth=3, embed_dim=48, num_heads=3, img_size=32,
                                 drop_path_rate=0.2).blocks
    assert isinstance(blocks[0].drop_path1, torch.nn.Identity)
    assert [b.drop_path1.p for b in blocks[1:]] == pytest.approx([0.1, 0.2])


# ----------------------------------------------------------------------------------------------------------- GELU
def test_gelu_exact_and_tanh_match_their_formulas_and_differ():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(make_act("gelu")(x), exact, atol=1e-12, rtol=0)
    torch.testing.assert_close(make_act("gelu_tanh")(x), tanh, atol=1e-12, rtol=0)
    gap = (make_act("gelu")(x) - make_act("gelu_tanh")(x)).abs().max().item()
    assert 1e-4 < gap < 1e-2  # ≈ 4.7e-4 near |x| = 2: enough to fail a 1e-4 parity check (golden README)


def test_act_layer_reaches_the_mlp():
    mlp = Mlp(8, 16, act_layer="gelu_tanh")
    x = torch.randn(3, 8)
    h = mlp.fc1(x)
    ref = mlp.fc2(0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))))
    torch.testing.assert_close(mlp(x), ref, atol=1e-6, rtol=0)
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_overrides("vit_tiny_patch16_224"), act_layer="gelu_tanh")
    assert model.blocks[0].mlp.act.approximate == "tanh"
    with pytest.raises(ValueError, match="swish"):
        make_act("swish")


# ------------------------------------------------------------------------------------------------ config checking
@pytest.mark.parametrize("overrides,named", [
    (dict(dept=3), "dept"),
    (dict(depth="3"), "depth"),
    (dict(embed_dim=50, num_heads=3), "embed_dim"),
    (dict(img_size=100), "img_size"),
    (dict(act_layer="swish"), "act_layer"),
    (dict(global_pool="max"), "global_pool"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(qkv_bias=1), "qkv_bias"),
], ids=["unknown", "ill-typed", "not-divisible", "img-not-multiple", "bad-act", "bad-pool", "bad-rate", "int-for-bool"])
def test_invalid_overrides_are_errors_naming_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named):
        vitkit.create_model("vit_tiny_patch16_224", **overrides)


def test_divisibility_error_names_both_keys():
    with pytest.raises(ConfigError) as e:
        vitkit.create_model("vit_tiny_patch16_224", embed_dim=50, num_heads=3)
    assert "embed_dim" in str(e.value) and "num_heads" in str(e.value)


def test_valid_overrides_are_coerced():
    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, mlp_ratio=2, img_size=[32, 48])
    assert model.cfg.mlp_ratio == 2.0 and isinstance(model.cfg.mlp_ratio, float)
    assert model.blocks[0].mlp.fc1.out_features == 384
    assert model.patch_embed.grid_size == (2, 3)


def test_patch_embed_rejects_wrong_input_size():
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_overrides("vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 48, 48))
    # the patch embedding is a stride-P conv: patch (r, c) depends only on its own P×P pixels
    x = torch.randn(1, 3, 32, 32)
    tokens = model.patch_embed(x)
    patch = x[:, :, 16:32, 0:16].reshape(1, -1)  # row 1, column 0 → token 2
    ref = patch @ model.patch_embed.proj.weight.reshape(48, -1).T + model.patch_embed.proj.bias
    torch.testing.assert_close(tokens[:, 2], ref, atol=1e-5, rtol=0)
