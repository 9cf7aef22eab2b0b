"""Statistics and seeded masks of the OFFICIAL blockwise masking generator, for ``tests/test_masking.py``.

    git -C unilm checkout 768a3c873f598bb9b4d4dfb9267b099e35f8fe56
    mkdir -p /tmp/official_masking && cp unilm/beit/masking_generator.py /tmp/official_masking/
    python tests/data_masking/make_official_stats.py /tmp/official_masking/masking_generator.py tests/data_masking/official_stats.json

The official file (microsoft/unilm ``beit/masking_generator.py``, unchanged since the release commit 2312c6f) is
imported unmodified; only ``np.int`` (removed in NumPy 1.24, used for its zero mask) is set to ``int`` first. It is
run as ``beit/datasets.py`` builds it with the defaults of ``run_beit_pretraining.py``: ``MaskingGenerator((14, 14),
num_masking_patches=75, max_num_patches=None, min_num_patches=16)``. Nothing of vitkit is imported here.

Two outputs:

- ``statistics``: 2,000 masks drawn as in training, from Python's ``random`` (seeded 0; NumPy's global state seeded
  0 too, though this file never draws from it). The module's ``random`` is replaced by a pass-through that makes the
  same calls and remembers the bounds of ``randint(0, H - h)`` / ``randint(0, W - w)``, so a subclass's ``_mask``
  can record each accepted block's corner and sides. Every statistic is a per-mask feature (``features`` below),
  stored as its sum and sum of squares over the masks.
- ``driven``: masks for seeds 0..n-1 with ``random.uniform`` / ``random.randint`` answered from a seeded
  ``torch.Generator`` by Python's own formulas (``uniform(a, b) = a + (b - a) * U``, U a float64 in [0, 1);
  ``randint(a, b)`` = ``torch.randint(a, b + 1)``): an implementation that draws the same numbers in the same order
  from a generator must reproduce them bit for bit.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import platform
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

COMMIT = "768a3c873f598bb9b4d4dfb9267b099e35f8fe56"
NUM_MASKS = 2000
STATS_CONFIG = {"grid": (14, 14), "num_masking_patches": 75, "min_num_patches": 16, "max_num_patches": None,
                "min_aspect": 0.3, "max_aspect": None}
DRIVEN_CONFIGS = [  # (config, number of seeds)
    (STATS_CONFIG, 100),
    ({"grid": (7, 10), "num_masking_patches": 30, "min_num_patches": 4, "max_num_patches": 12, "min_aspect": 0.5,
      "max_aspect": 3.0}, 100),
    ({"grid": (14, 14), "num_masking_patches": 118, "min_num_patches": 16, "max_num_patches": None,
      "min_aspect": 0.3, "max_aspect": None}, 50),
]
AREA_EDGES = (4, 8, 12, 16, 20, 25, 30, 40, 50, 60)  # block area h * w
LOG_ASPECT_EDGES = (-1.2, -1.0, -0.6, -0.1, 0.1, 0.6, 1.0, 1.2)  # log(h / w); no ratio of small ints lies on one
SHORTFALL_EDGES = (0, 1, 2, 3, 4)  # target - count: < 0 (an overshoot), 0, 1, 2, 3, >= 4
BLOCKS_EDGES = (3, 4, 5, 6, 7)  # blocks per mask: <= 2, 3, 4, 5, 6, >= 7

Blocks = Sequence[tuple[int, int, int, int, int]]  # (top, left, height, width, newly masked)


# ---------------------------------------------------------------------------------------------- statistics (shared)
def _bin(value: float, edges: Sequence[float]) -> int:
    """Bin k holds [edges[k - 1], edges[k]); bin 0 is below the first edge, the last bin is from the last edge up."""
    return sum(value >= e for e in edges)


def features(mask: np.ndarray, blocks: Blocks, target: int) -> dict[str, int]:
    """The per-mask features: coverage of each position, shortfall of the count, number of blocks, and how many
    blocks fall in each area and log-aspect bin. Masks are i.i.d., so each feature's mean over masks is
    asymptotically normal; ``tests/test_masking.py`` compares the means."""
    H, W = mask.shape
    out = {f"coverage/{i},{j}": int(mask[i, j]) for i in range(H) for j in range(W)}
    out.update({f"shortfall/{k}": int(_bin(target - int(mask.sum()), SHORTFALL_EDGES) == k)
                for k in range(len(SHORTFALL_EDGES) + 1)})
    out.update({f"blocks/{k}": int(_bin(len(blocks), BLOCKS_EDGES) == k) for k in range(len(BLOCKS_EDGES) + 1)})
    out.update({f"area/{k}": 0 for k in range(len(AREA_EDGES) + 1)})
    out.update({f"log_aspect/{k}": 0 for k in range(len(LOG_ASPECT_EDGES) + 1)})
    for _, _, h, w, _ in blocks:
        out[f"area/{_bin(h * w, AREA_EDGES)}"] += 1
        out[f"log_aspect/{_bin(math.log(h / w), LOG_ASPECT_EDGES)}"] += 1
    return out


def summarize(samples: Iterable[tuple[np.ndarray, Blocks]], target: int) -> dict:
    """``{"n": masks, "features": {name: [sum, sum of squares]}}`` (integers, exact in JSON)."""
    n, sums = 0, {}
    for mask, blocks in samples:
        n += 1
        for name, v in features(mask, blocks, target).items():
            s = sums.setdefault(name, [0, 0])
            s[0] += v
            s[1] += v * v
    return {"n": n, "features": sums}


def pack(mask: np.ndarray) -> str:
    """Row-major bits as hex."""
    bits = "".join("1" if b else "0" for b in np.asarray(mask).reshape(-1))
    return format(int(bits, 2), f"0{(len(bits) + 3) // 4}x")


# ----------------------------------------------------------------------------------------------- running the official
class RecordingRandom:
    """Stands in for the module's ``random``: the same calls on ``source``; remembers ``randint``'s upper bounds."""

    def __init__(self, source) -> None:
        self.source, self.randints = source, []

    def uniform(self, a: float, b: float) -> float:
        return self.source.uniform(a, b)

    def randint(self, a: int, b: int) -> int:
        value = self.source.randint(a, b)
        self.randints.append((b, value))
        return value


class TorchDraws:
    """``random.uniform`` / ``random.randint`` with Python's formulas, from a ``torch.Generator``."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * torch.rand((), generator=self.g, dtype=torch.float64).item()

    def randint(self, a: int, b: int) -> int:
        return int(torch.randint(a, b + 1, (), generator=self.g).item())


def load_official(path: Path):
    if not hasattr(np, "int"):
        np.int = int  # removed in NumPy 1.24; the official file builds its mask with dtype=np.int
    spec = importlib.util.spec_from_file_location("official_masking_generator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recording_generator(module, config: dict):
    """An official ``MaskingGenerator`` whose ``_mask`` also appends each accepted block to ``self.blocks``."""

    class Recording(module.MaskingGenerator):
        def _mask(self, mask, max_mask_patches):
            module.random.randints.clear()
            delta = super()._mask(mask, max_mask_patches)
            if delta > 0:
                (b_top, top), (b_left, left) = module.random.randints[-2:]
                self.blocks.append((top, left, self.height - b_top, self.width - b_left, delta))
            return delta

        def sample(self):
            self.blocks = []
            return self().astype(bool), list(self.blocks)

    c = dict(config)
    return Recording(c.pop("grid"), **c)


def official_statistics(module) -> dict:
    random.seed(0)
    np.random.seed(0)
    module.random = RecordingRandom(random)
    gen = recording_generator(module, STATS_CONFIG)
    return summarize((gen.sample() for _ in range(NUM_MASKS)), STATS_CONFIG["num_masking_patches"])


def official_driven(module, config: dict, seeds: int) -> list[str]:
    gen = recording_generator(module, config)
    masks = []
    for seed in range(seeds):
        module.random = RecordingRandom(TorchDraws(seed))
        masks.append(pack(gen.sample()[0]))
    return masks


def main(official: Path, out: Path) -> None:
    module = load_official(official)
    record = {
        "source": f"microsoft/unilm beit/masking_generator.py@{COMMIT}",
        "sha256": hashlib.sha256(official.read_bytes()).hexdigest(),
        "made_with": f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
        "config": STATS_CONFIG, "seed": 0,
        "edges": {"area": AREA_EDGES, "log_aspect": LOG_ASPECT_EDGES, "blocks": BLOCKS_EDGES,
                  "shortfall": SHORTFALL_EDGES},
        "statistics": official_statistics(module),
        "driven": [{"config": c, "masks": official_driven(module, c, n)} for c, n in DRIVEN_CONFIGS],
    }
    text = json.dumps(record, indent=1)
    text = re.sub(r"\[\s+([-0-9.,\s]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    out.write_text(text + "\n")  # lists of numbers on one line


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
