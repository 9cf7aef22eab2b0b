"""The ViT paper's Figure 7 (Dosovitskiy et al. 2021, §4.5 "Inspecting Vision Transformer") for any token model:

- left: the top principal components of the patch-embedding filters (the paper shows 28 for ViT-L/32);
- centre: the cosine similarity of each patch's position embedding with every other one, one tile per patch;
- right: the mean attention distance of every head against depth, over a set of images: for each query patch, the
  pixel distance to every other patch weighted by the attention it pays them, averaged over the query patches and the
  images (the paper: "analogous to receptive field size in CNNs").

The paper observes that attention distance grows with depth, and that some heads attend globally already in the
lowest layers while others stay local. ``figure7`` computes the three panels' numbers; ``plot_figure7`` draws them
(matplotlib, from the train extra).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.attention import record_attention
from vitkit.families.contract import token_grid

__all__ = ["Figure7", "figure7", "patch_filter_components", "position_similarity", "mean_attention_distance",
           "plot_figure7"]


@dataclass
class Figure7:
    components: Tensor | None  # (k, C, P, P) principal components of the patch-embedding filters, each in [0, 1]
    explained: list[float] = field(default_factory=list)  # variance fraction of each component
    similarity: Tensor | None = None  # (gh, gw, gh, gw) cosine similarity of position embeddings
    distance: Tensor | None = None  # (layers, heads) mean attention distance in pixels
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"explained_variance": self.explained,
                "mean_attention_distance_px": self.distance.tolist() if self.distance is not None else None,
                "notes": self.notes}


def patch_filter_components(filters: Tensor, k: int = 28) -> tuple[Tensor, list[float]]:
    """(D, C, P, P) linear patch-embedding filters → their top-``k`` principal components (k, C, P, P), each scaled to
    [0, 1] for display, and the fraction of variance each explains. The filters are centred over the D outputs."""
    D = filters.shape[0]
    flat = filters.reshape(D, -1).double()
    flat = flat - flat.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)  # rows of vh: components in filter space
    k = min(k, vh.shape[0])
    comps = vh[:k].reshape(k, *filters.shape[1:]).float()
    lo = comps.flatten(1).amin(1)[:, None, None, None]
    hi = comps.flatten(1).amax(1)[:, None, None, None]
    var = (s ** 2 / (s ** 2).sum())[:k]
    return (comps - lo) / (hi - lo).clamp(min=1e-12), [float(v) for v in var]


def position_similarity(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """(h·w, D) position embeddings of a patch grid → (h, w, h, w) cosine similarities: tile [i, j] is the similarity
    of patch (i, j)'s embedding with every patch's."""
    h, w = grid
    unit = F.normalize(pos.float(), dim=-1)
    return (unit @ unit.t()).reshape(h, w, h, w)


def _distances(grid: tuple[int, int], patch_px: tuple[float, float]) -> Tensor:
    """(N, N) pixel distances between the centres of a grid's patches."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h) * patch_px[0], torch.arange(w) * patch_px[1], indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], -1).float()  # (N, 2)
    return torch.cdist(centres, centres)


def mean_attention_distance(model: nn.Module, images: Tensor, batch_size: int = 8) -> Tensor:
    """(layers, heads) mean attention distance in pixels over ``images`` (B, C, H, W): patch-to-patch attention of
    every (N, N) token layer, each row renormalised over the patch keys."""
    H, W = images.shape[-2:]
    prefix = model.num_prefix_tokens
    total, count = None, 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        with torch.no_grad(), record_attention(model) as maps:
            model(x)
        layers = [a for a in maps.values() if a.shape[-1] == a.shape[-2] and a.shape[0] == len(x)]
        per_layer = []
        for attn in layers:  # (B, heads, N, N)
            patch = attn[..., prefix:, prefix:]
            patch = patch / patch.sum(-1, keepdim=True).clamp(min=1e-12)
            grid = token_grid(patch.shape[-1], (H, W))
            dist = _distances(grid, (H / grid[0], W / grid[1]))
            per_layer.append((patch * dist).sum(-1).mean(-1).sum(0))  # (heads,): summed over images
        stacked = torch.stack(per_layer)  # (layers, heads)
        total = stacked if total is None else total + stacked
        count += len(x)
    return total / count


def figure7(model: nn.Module, images: Tensor, components: int = 28) -> Figure7:
    fig = Figure7(None)
    filters = model.patch_embedding_filters()
    if filters is not None:
        fig.components, fig.explained = patch_filter_components(filters.detach(), components)
    else:
        fig.notes.append(f"{type(model).__name__} has no linear patch embedding (a convolutional or unfolding stem): "
                         f"no filter components")
    pos = model.position_embedding_grid()
    if pos is not None:
        fig.similarity = position_similarity(pos[0].detach(), pos[1])
    else:
        fig.notes.append(f"{type(model).__name__} has no learned absolute position embedding of the patch grid")
    fig.distance = mean_attention_distance(model.eval(), images)
    return fig


def _mosaic(tiles: Tensor, cols: int, pad: int = 1, fill: float = 1.0) -> Tensor:
    """(n, h, w[, c]) tiles → one (rows·(h+pad), cols·(w+pad)[, c]) image, row-major, ``fill`` between tiles."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    out = torch.full((rows * (h + pad), cols * (w + pad), *tiles.shape[3:]), fill)
    for k in range(n):
        r, c = divmod(k, cols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = tiles[k]
    return out


def plot_figure7(fig: Figure7, path: str, title: str = "") -> str:
    """Draw the available panels side by side into one PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for p in ("components", "similarity", "distance") if getattr(fig, p) is not None]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 5.0), squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        if panel == "components":
            tiles = fig.components[:, :3].permute(0, 2, 3, 1)  # (k, P, P, 3)
            ax.imshow(_mosaic(tiles, cols=7).numpy(), interpolation="nearest")
            ax.set_title(f"RGB embedding filters\n(first {len(tiles)} principal components)")
            ax.axis("off")
        elif panel == "similarity":
            h, w = fig.similarity.shape[:2]
            image = _mosaic(fig.similarity.reshape(h * w, h, w), cols=w, fill=float("nan"))
            shown = ax.imshow(image.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_title("Position embedding similarity")
            ax.set_xticks([(w + 1) * j + w / 2 for j in range(w)], [str(j + 1) if j % 2 == 0 else "" for j in range(w)])
            ax.set_yticks([(h + 1) * i + h / 2 for i in range(h)], [str(i + 1) if i % 2 == 0 else "" for i in range(h)])
            ax.set_xlabel("input patch column")
            ax.set_ylabel("input patch row")
            figure.colorbar(shown, ax=ax, fraction=0.046, label="cosine similarity")
        else:
            dist = fig.distance
            for head in range(dist.shape[1]):
                ax.scatter(torch.arange(dist.shape[0]).numpy(), dist[:, head].numpy(), s=12, label=f"head {head + 1}")
            ax.set_xlabel("network depth (layer)")
            ax.set_ylabel("mean attention distance (pixels)")
            ax.set_title("Mean attention distance")
            ax.grid(alpha=0.3)
            if dist.shape[1] <= 16:
                ax.legend(fontsize=7, ncol=2)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path
