"""The DALL-E dVAE encoder reference case: files made like the released ``encoder.pkl`` (``torch.save`` of the
official ``dall_e.encoder.Encoder`` module), and the official encoder's logits and ids on seeded images.

    git -C DALL-E checkout 5be4b236bc3ade6943662354117a0e83752cc322
    PYTHONPATH=/path/to/DALL-E:<attrs>:<requests stand-in> python tests/tokenizers/data/make_dalle_case.py \
        tests/tokenizers/data

The official files run unmodified; ``requests`` (imported by ``dall_e/__init__.py`` for ``load_model(url)`` only)
is an empty stand-in module. The constructor's attrs validators (``n_hid >= 64``, ``vocab_size >= 512``) are switched
off with ``attr.validators.disabled()`` so the encoder fits in a few hundred KB; the module is still built by the
official ``__attrs_post_init__``. Weights: the official init (kernels N(0, 1/fan_in)), then biases 0.1 N(0, 1) so
they matter. Nothing of the official code is copied here.

- ``dalle_encoder_legacy.pkl``: n_hid 16, n_blk_per_group 2, vocab 128, saved with
  ``_use_new_zipfile_serialization=False``: the legacy container, the one the release uses (``torch.load`` of it
  takes ``_legacy_load``, microsoft/unilm issue #756).
- ``dalle_encoder_zip.pkl``: n_hid 8, n_blk_per_group 1, vocab 64, the zip container (torch >= 1.6 default).
- ``dalle_io.safetensors``: per case ``{case}_images`` (raw [0, 1] pixels, seeded uniform), ``{case}_logits`` =
  ``Encoder(map_pixels(images))`` and ``{case}_ids`` = its argmax over the vocabulary (as BEiT's
  ``get_codebook_indices``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import attr
import torch
from dall_e.encoder import Encoder
from dall_e.utils import map_pixels
from safetensors.torch import save_file

COMMIT = "5be4b236bc3ade6943662354117a0e83752cc322"
CASES = {  # name: (constructor arguments, zip container?, image batch shape)
    "legacy": ({"n_hid": 16, "n_blk_per_group": 2, "vocab_size": 128}, False, (2, 3, 32, 32)),
    "zip": ({"n_hid": 8, "n_blk_per_group": 1, "vocab_size": 64}, True, (1, 3, 24, 40)),
}


def build(kwargs: dict, seed: int) -> Encoder:
    torch.manual_seed(seed)
    with attr.validators.disabled():
        encoder = Encoder(**kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith(".b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return encoder


def main(out: Path) -> None:
    io = {}
    for seed, (case, (kwargs, use_zip, shape)) in enumerate(CASES.items()):
        encoder = build(kwargs, seed)
        torch.save(encoder, out / f"dalle_encoder_{case}.pkl", _use_new_zipfile_serialization=use_zip)
        images = torch.rand(shape, generator=torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            logits = encoder(map_pixels(images))
        io.update({f"{case}_images": images, f"{case}_logits": logits, f"{case}_ids": logits.argmax(dim=1)})
    save_file(io, out / "dalle_io.safetensors", metadata={"dall_e_commit": COMMIT, "torch": torch.__version__})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
