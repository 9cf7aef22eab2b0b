"""A small VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning", arXiv:1711.00937) that
vitkit trains itself on unlabelled images, as a visual tokenizer for masked image modelling.

Architecture (Sec. 4.1, scaled down): the encoder is ``log2(downsample)`` strided 4x4 convolutions (stride 2), a 3x3
convolution and ``res_blocks`` residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv), then a 1x1 projection to
``code_dim``; the decoder mirrors it with 4x4 transposed convolutions. ``downsample`` is the tokenizer's pixels per
token and must equal the masked-image model's patch size (32 px images, patch 4: ``downsample=4``, an 8x8 grid).

Quantisation: nearest codebook entry (squared L2), straight-through gradients (Sec. 3.1: the decoder's input
gradient is copied to the encoder output), loss = reconstruction MSE + ``beta`` ||z_e - sg[e]||^2 with
``beta = 0.25`` (Eq. 3; Sec. 4.1 uses 0.25). The codebook is **not** learnt by the codebook loss but by exponential
moving averages (Appendix A.1: N_i <- g N_i + (1 - g) n_i, m_i <- g m_i + (1 - g) sum z, e_i = m_i / N_i, g = 0.99),
chosen because its updates do not depend on the optimiser or its learning rate (deepmind/sonnet
sonnet/src/nets/vqvae.py@5a46569 ``VectorQuantizerEMA``, whose docstring says the same; without its zero-debiasing).
As in openai/jukebox jukebox/vqvae/bottleneck.py@08efbbc (``BottleneckBlock.init_k``, ``update_k``) the codebook is
initialised from random encoder outputs of the first batch, and a code whose EMA count falls below
``restart_threshold`` is restarted at a random encoder output of the current batch (here with its count reset to the
threshold, so that it must then be used to stay), which keeps small codebooks from collapsing on small data.

Input: raw RGB in [0, 1] (``VisualTokenizer``'s convention), centred to [-0.5, 0.5] inside, so the reconstruction
MSE is in [0, 1] pixel units. ``tokenize`` returns code indices ``(B, H/downsample, W/downsample)``. ``save`` writes a
folder with ``model.safetensors`` (weights, codebook and its EMA state) and ``config.json``.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.tokenizers.base import VisualTokenizer, check_images

__all__ = ["VQConfig", "VQVAE", "EMACodebook", "VQTraining", "train_vq", "perplexity"]

CONFIG_KIND = "vitkit-vq-vae"


@dataclass(frozen=True)
class VQConfig:
    downsample: int = 4  # pixels per token side: the masked-image model's patch size (a power of two)
    hidden: int = 64  # convolution width
    res_blocks: int = 2
    codebook_size: int = 1024
    code_dim: int = 32
    beta: float = 0.25  # commitment weight (Eq. 3)
    decay: float = 0.99  # EMA decay g (Appendix A.1)
    restart_threshold: float = 1.0  # EMA count under which a code is restarted (Jukebox: 1.0)

    def __post_init__(self) -> None:
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if self.hidden % 2 or self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError(f"invalid VQ config: {self}")


class _Residual(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x)))) (Sec. 4.1)."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width // 2, width, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _encoder(cfg: VQConfig) -> nn.Sequential:
    """(B, 3, H, W) -> (B, code_dim, H/f, W/f): strided 4x4 convs (hidden/2 wide, the last hidden), 3x3, residuals."""
    n_down = int(math.log2(cfg.downsample))
    widths = [3] + [cfg.hidden // 2] * (n_down - 1) + [cfg.hidden]
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(widths):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(cfg.hidden, cfg.hidden, 3, padding=1))
    layers += [_Residual(cfg.hidden) for _ in range(cfg.res_blocks)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.code_dim, 1))


def _decoder(cfg: VQConfig) -> nn.Sequential:
    """(B, code_dim, h, w) -> (B, 3, h*f, w*f): 3x3, residuals, transposed 4x4 convs mirroring the encoder."""
    n_down = int(math.log2(cfg.downsample))
    widths = [cfg.hidden] + [cfg.hidden // 2] * (n_down - 1) + [3]
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, cfg.hidden, 3, padding=1)]
    layers += [_Residual(cfg.hidden) for _ in range(cfg.res_blocks)]
    layers.append(nn.ReLU())
    for i, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
        if i < n_down - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class EMACodebook(nn.Module):
    """``codebook_size`` entries of ``code_dim``, learnt by EMA (Appendix A.1) with Jukebox's restarts. All state
    is buffers: ``embed`` (K, d), ``ema_count`` (K,), ``ema_sum`` (K, d), ``initialised``."""

    def __init__(self, size: int, dim: int, decay: float, restart_threshold: float):
        super().__init__()
        self.decay, self.restart_threshold = decay, restart_threshold
        self.register_buffer("embed", torch.zeros(size, dim))
        self.register_buffer("ema_count", torch.ones(size))
        self.register_buffer("ema_sum", torch.zeros(size, dim))
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, flat: Tensor) -> Tensor:
        """(N, d) vectors to the ids (N,) of their nearest entries: argmin ||z||^2 - 2 z.e + ||e||^2."""
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t()
                     + self.embed.pow(2).sum(1)[None, :])  # (N, K)
        return distances.argmin(dim=1)

    @torch.no_grad()
    def initialise(self, flat: Tensor, generator: torch.Generator) -> None:
        """Entries drawn from the batch's encoder outputs (with replacement if the batch is smaller)."""
        picks = torch.randint(flat.shape[0], (self.embed.shape[0],), generator=generator).to(flat.device)
        self.embed.copy_(flat[picks])
        self.ema_sum.copy_(flat[picks])
        self.ema_count.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, flat: Tensor, ids: Tensor, generator: torch.Generator) -> int:
        """One EMA step from a batch's encoder outputs ``flat`` (N, d) and their ids (N,); returns how many entries
        were restarted."""
        counts = torch.bincount(ids, minlength=self.embed.shape[0]).to(flat.dtype)  # n_i
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, flat)  # sum of the z assigned to i
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        dead = (self.ema_count < self.restart_threshold).nonzero().flatten()
        if len(dead):
            picks = torch.randint(flat.shape[0], (len(dead),), generator=generator).to(flat.device)
            self.ema_count[dead] = self.restart_threshold
            self.ema_sum[dead] = flat[picks] * self.restart_threshold
        self.embed.copy_(self.ema_sum / self.ema_count[:, None])
        return len(dead)


class VQVAE(VisualTokenizer):
    """Encoder, EMA codebook, decoder. ``tokenize(images)`` gives code ids; ``decode_ids`` maps them back to
    pixels; ``losses`` is one training step's objective."""

    def __init__(self, cfg: VQConfig = VQConfig()):
        super().__init__()
        self.cfg, self.vocab_size, self.downsample = cfg, cfg.codebook_size, cfg.downsample
        self.encoder, self.decoder = _encoder(cfg), _decoder(cfg)
        self.codebook = EMACodebook(cfg.codebook_size, cfg.code_dim, cfg.decay, cfg.restart_threshold)

    def preprocess(self, images: Tensor) -> Tensor:
        return images.float() - 0.5

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder outputs (B, d, h, w) to ids (B, h, w) and their entries (B, d, h, w)."""
        b, d, h, w = z.shape
        ids = self.codebook.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)  # (B*h*w, d) -> (B, h, w)
        return ids, self.codebook.embed[ids].permute(0, 3, 1, 2)  # (B, h, w, d) -> (B, d, h, w)

    def ids_from_input(self, x: Tensor) -> Tensor:
        return self.quantize(self.encoder(x))[0]

    @torch.no_grad()
    def decode_ids(self, ids: Tensor) -> Tensor:
        """Ids (B, h, w) to images (B, 3, h*f, w*f) in [0, 1]."""
        q = self.codebook.embed[ids].permute(0, 3, 1, 2)  # (B, h, w, d) -> (B, d, h, w)
        return (self.decoder(q) + 0.5).clamp(0, 1)

    def losses(self, images: Tensor) -> dict[str, Tensor]:
        """Reconstruction MSE (pixel units), commitment ||z - sg[e]||^2, ``loss`` = mse + beta * commitment; also
        the encoder outputs ``z`` and ``ids`` for the codebook update."""
        x = self.preprocess(images)
        z = self.encoder(x)
        ids, q = self.quantize(z)
        recon = self.decoder(z + (q - z).detach())  # straight-through: the decoder's gradient goes to z
        mse, commitment = F.mse_loss(recon, x), F.mse_loss(z, q.detach())
        return {"loss": mse + self.cfg.beta * commitment, "mse": mse, "commitment": commitment, "z": z, "ids": ids}

    def save(self, folder: str | os.PathLike) -> Path:
        """``folder/model.safetensors`` + ``folder/config.json``."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"kind": CONFIG_KIND, "config": asdict(self.cfg)}, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> VQVAE:
        from safetensors.torch import load_file
        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("kind") != CONFIG_KIND:
            raise ValueError(f"{folder}/config.json is not a saved VQ-VAE tokenizer (kind {meta.get('kind')!r})")
        model = cls(VQConfig(**meta["config"]))
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.eval()


def perplexity(ids: Tensor, vocab_size: int) -> float:
    """exp(entropy) of the ids' histogram: the number of equally used codes it is worth."""
    p = torch.bincount(ids.flatten(), minlength=vocab_size).double() / ids.numel()
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())


@dataclass
class VQTraining:
    """A trained tokenizer and, per step, its ``loss``, ``mse``, ``commitment``, batch ``perplexity`` and number of
    ``restarted`` codes."""
    model: VQVAE
    history: list[dict[str, float]] = field(default_factory=list)


def _as_float_images(batch: Tensor | tuple | list) -> Tensor:
    """A batch (or the first item of an ``(images, labels)`` pair) as float [0, 1]; uint8 is divided by 255."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    check_images(images)
    return images


def _batches(images: Tensor | Iterable, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Random batches (with ``generator``) from an (N, 3, H, W) tensor, or the items of an iterable, cycled."""
    if isinstance(images, Tensor):
        while True:
            yield _as_float_images(images[torch.randint(len(images), (batch_size,), generator=generator)])
    else:
        while True:
            empty = True
            for batch in images:
                empty = False
                yield _as_float_images(batch)
            if empty:  # a generator is spent after one pass
                raise ValueError("train_vq: the image iterable gave no batches (a generator can be read only once: "
                                 "pass a tensor, a list of batches or a DataLoader)")


def _built(cfg: VQConfig, generator: torch.Generator) -> VQVAE:
    """A model whose initial weights come from ``generator`` (the global RNG is left as it was)."""
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQVAE(cfg)


def train_vq(images: Tensor | Iterable, steps: int, generator: torch.Generator, *, config: VQConfig = VQConfig(),
             model: VQVAE | None = None, batch_size: int = 64, lr: float = 1e-3) -> VQTraining:
    """Train a VQ-VAE tokenizer on unlabelled images: an (N, 3, H, W) tensor (uint8 or [0, 1] float; batches drawn
    with ``generator``) or an iterable of such batches (or ``(images, labels)`` pairs), cycled for ``steps`` steps of
    Adam. ``model`` continues a previous training instead of building one from ``config``. Same generator, same
    data order and same threads give the same model."""
    model = model if model is not None else _built(config, generator)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    result = VQTraining(model)
    for _, batch in zip(range(steps), _batches(images, batch_size, generator)):
        result.history.append(_step(model, optimizer, batch, generator))
    model.eval()
    return result


def _step(model: VQVAE, optimizer: torch.optim.Optimizer, images: Tensor, generator: torch.Generator
          ) -> dict[str, float]:
    """Initialise the codebook on the first batch, then one optimiser step and one EMA codebook update."""
    if not bool(model.codebook.initialised):
        with torch.no_grad():
            z = model.encoder(model.preprocess(images))
        model.codebook.initialise(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), generator)  # (B*h*w, d)
    out = model.losses(images)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    flat = out["z"].detach().permute(0, 2, 3, 1).reshape(-1, out["z"].shape[1])  # (B, d, h, w) -> (B*h*w, d)
    restarted = model.codebook.update(flat, out["ids"].flatten(), generator)
    return {"loss": out["loss"].item(), "mse": out["mse"].item(), "commitment": out["commitment"].item(),
            "perplexity": perplexity(out["ids"], model.vocab_size), "restarted": float(restarted)}


# ------------------------------------------------------------------------------------------------ command line
def _images(data: str, root: str, limit: int | None) -> Tensor:
    """(N, 3, H, W) uint8: CIFAR-10's training images (labels ignored) or every image under a folder (one size)."""
    from vitkit.data import CIFAR10, UnlabelledImages
    dataset = CIFAR10(root, "train") if data == "cifar10" else UnlabelledImages(root)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)])


def main(argv: list[str] | None = None) -> int:
    """``python -m vitkit.tokenizers --data cifar10 --root DIR --out FOLDER``: train the tokenizer a masked-image
    model's ``train.mim.tokenizer`` names (``--downsample`` = the model's patch size)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m vitkit.tokenizers", description=main.__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("cifar10", "images"), required=True)
    parser.add_argument("--root", required=True, help="CIFAR-10's folder, or a folder of images of one size")
    parser.add_argument("--out", required=True, help="the tokenizer folder to write")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--downsample", type=int, default=4)
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images = _images(args.data, args.root, args.limit)
    config = VQConfig(downsample=args.downsample, codebook_size=args.codebook)
    trained = train_vq(images, args.steps, torch.Generator().manual_seed(args.seed), config=config)
    last = trained.history[-1]
    folder = trained.model.save(args.out)
    print(f"{folder}: {args.steps} steps on {len(images)} images, mse {last['mse']:.4f}, perplexity "
          f"{last['perplexity']:.0f} of {args.codebook} codes")
    return 0

