"""vitkit.data.masking: blockwise masking against the OFFICIAL generator (microsoft/unilm beit/masking_generator.py
@768a3c8), whose statistics and seeded masks ``tests/data_masking/make_official_stats.py`` recorded.

Error model of the statistical comparison: every statistic is the mean over masks of a per-mask feature (whether a
position is masked; the count's shortfall and the number of blocks, one-hot; how many blocks fall in each area and
log-aspect bin). Masks are i.i.d., so each mean is asymptotically normal. For the two samples (official: Python's
``random``; vitkit: per-sample torch generators) the difference of means is compared with its standard error under
the null hypothesis (the variance of the pooled sample): z = (m1 - m2) / sqrt(v (1/n1 + 1/n2)). Over K features a
Bonferroni bound with family-wise false-alarm rate 1e-3 gives |z| <= Phi^-1(1 - 1e-3 / 2K) (4.59 for the K = 228 here).
"""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from vitkit.data import BlockwiseMasking, sample_generator

DATA = Path(__file__).resolve().parent / "data_masking"
sys.path.insert(0, str(DATA))  # the reference script's statistics, so both sides are summarised by the same code
from make_official_stats import pack, summarize

OFFICIAL = json.loads((DATA / "official_stats.json").read_text())
FAMILY_ALPHA = 1e-3


def _masking(config: dict, **override) -> BlockwiseMasking:
    c = {**config, **override}
    return BlockwiseMasking(tuple(c.pop("grid")), **c)


def _vitkit_summary(masking: BlockwiseMasking, n: int, seed: int = 0) -> dict:
    """n masks from the per-sample generators a training run would use."""
    def samples():
        for i in range(n):
            mask, blocks = masking.sample(sample_generator(seed, 0, i))
            yield mask.numpy(), [(b.top, b.left, b.height, b.width, b.new) for b in blocks]
    return summarize(samples(), masking.num_masking_patches)


def _z_scores(a: dict, b: dict) -> dict[str, float]:
    """Two-sample z of each feature's mean, with the pooled sample's variance (see the module docstring)."""
    out = {}
    for name, (s1, q1) in a["features"].items():
        s2, q2 = b["features"][name]
        n1, n2 = a["n"], b["n"]
        mean = (s1 + s2) / (n1 + n2)
        var = (q1 + q2) / (n1 + n2) - mean * mean
        diff = s1 / n1 - s2 / n2
        out[name] = diff / math.sqrt(var * (1 / n1 + 1 / n2)) if var > 0 else (0.0 if diff == 0 else math.inf)
    return out


def _z_bound(k: int) -> float:
    return NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * k))


def _worst(z: dict[str, float], k: int = 5) -> list[tuple[str, float]]:
    return sorted(z.items(), key=lambda kv: -abs(kv[1]))[:k]


# --------------------------------------------------------------------------------------- against the official file
def test_the_reference_is_the_pinned_official_file():
    assert OFFICIAL["source"].endswith("beit/masking_generator.py@768a3c873f598bb9b4d4dfb9267b099e35f8fe56")
    assert OFFICIAL["sha256"] == "4248f3fe564cfc60b4bf5c1abe337a4108a059dd0f9bd475c18491ac7ebcd3ac"


@pytest.mark.parametrize("case", range(len(OFFICIAL["driven"])))
def test_same_draws_give_the_official_masks_bit_for_bit(case):
    """The official code with ``random.uniform`` / ``random.randint`` answered from a seeded torch generator (Python's
    formulas) made these masks; vitkit draws the same numbers in the same order, so it must make the same masks:
    the loop, the 10 attempts, the ``0 < new <= budget`` rule and the early stop, not just their distribution."""
    driven = OFFICIAL["driven"][case]
    masking = _masking(driven["config"])
    got = [pack(masking(torch.Generator().manual_seed(seed)).numpy()) for seed in range(len(driven["masks"]))]
    mismatched = [seed for seed, (a, b) in enumerate(zip(got, driven["masks"])) if a != b]
    assert not mismatched, f"{masking}: seeds {mismatched[:10]} differ from the official masks"


def test_the_driven_cases_include_masks_that_stop_short():
    """The bit-for-bit cases exercise the early stop: some official masks there end below the target."""
    for driven in OFFICIAL["driven"]:
        target = driven["config"]["num_masking_patches"]
        counts = [int(h, 16).bit_count() for h in driven["masks"]]
        assert max(counts) == target and min(counts) < target


def test_statistics_match_the_official_generator():
    """2,000 masks at 14x14 / 75 (224 px, patch 16, the pre-training defaults) against 2,000 official ones."""
    ref = OFFICIAL["statistics"]
    ours = _vitkit_summary(_masking(OFFICIAL["config"]), ref["n"])
    z = _z_scores(ours, ref)
    bound = _z_bound(len(z))
    assert max(abs(v) for v in z.values()) <= bound, f"|z| > {bound:.2f}: {_worst(z)}"


@pytest.mark.parametrize("override", [{"min_aspect": 0.5}, {"min_num_patches": 9}], ids=["aspect", "min_block"])
def test_the_statistical_check_sees_a_different_generator(override):
    """The check above has power: a generator with a narrower aspect range (0.5 to 2) or smaller blocks (>= 9)
    fails it."""
    ref = OFFICIAL["statistics"]
    z = _z_scores(_vitkit_summary(_masking(OFFICIAL["config"], **override), ref["n"]), ref)
    assert max(abs(v) for v in z.values()) > _z_bound(len(z)), _worst(z)


def test_the_count_never_overshoots_and_blocks_explain_the_mask():
    masking = BlockwiseMasking((14, 14), 75)
    for i in range(200):
        mask, blocks = masking.sample(sample_generator(1, 0, i))
        assert mask.dtype == torch.bool and mask.shape == (14, 14)
        assert int(mask.sum()) == sum(b.new for b in blocks) <= 75
        union = torch.zeros(14, 14, dtype=torch.bool)
        for b in blocks:
            assert 0 < b.height < 14 and 0 < b.width < 14 and 0 < b.new <= b.height * b.width
            union[b.top:b.top + b.height, b.left:b.left + b.width] = True
        assert torch.equal(union, mask)


def test_the_count_is_exact_when_every_block_fits():
    """With blocks that always find room (a 4-patch target on an empty 14x14 grid: any block of 1-4 patches fits),
    the count is exactly the target, as in the official loop."""
    masking = BlockwiseMasking((14, 14), 4, min_num_patches=1)
    assert all(int(masking(sample_generator(2, 0, i)).sum()) == 4 for i in range(200))


# ------------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_mask_different_seeds_differ():
    masking = BlockwiseMasking((14, 14), 75)
    for seed in range(5):
        assert torch.equal(masking(torch.Generator().manual_seed(seed)), masking(torch.Generator().manual_seed(seed)))
    masks = {pack(masking(torch.Generator().manual_seed(seed)).numpy()) for seed in range(50)}
    assert len(masks) == 50


def test_the_mask_sequence_depends_only_on_the_generator_state():
    """Resume: a generator restored from a saved state continues the same sequence of masks."""
    masking = BlockwiseMasking((14, 14), 75)
    g = torch.Generator().manual_seed(123)
    first = [masking(g) for _ in range(3)]
    state = g.get_state()
    rest = [masking(g) for _ in range(5)]
    resumed = torch.Generator()
    resumed.set_state(state)
    assert all(torch.equal(a, masking(resumed)) for a in rest)
    assert not torch.equal(first[0], rest[0])


def test_no_global_random_state_is_used():
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    BlockwiseMasking((14, 14), 75)(torch.Generator().manual_seed(0))
    assert random.getstate() == py
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    assert torch.equal(torch.get_rng_state(), torch_state)


# ------------------------------------------------------------------------------------------------ config and text
def test_defaults_repr_and_describe():
    masking = BlockwiseMasking(14, 75)
    assert masking.grid == (14, 14) and masking.max_num_patches == 75 and masking.min_num_patches == 16
    assert masking.aspect == (0.3, 1 / 0.3)
    assert repr(masking) == ("BlockwiseMasking(grid=(14, 14), num_masking_patches=75, min_num_patches=16, "
                             "max_num_patches=75, min_aspect=0.3, max_aspect=3.333)")
    assert "75 of 14x14 patches (38.3%)" in masking.describe()


@pytest.mark.parametrize("kwargs", [{"grid": (0, 14)}, {"num_masking_patches": 197}, {"num_masking_patches": -1},
                                    {"min_num_patches": 0}, {"max_num_patches": 0}, {"min_aspect": 0.0},
                                    {"min_aspect": 2.0, "max_aspect": 1.0}])
def test_bad_configs_are_refused(kwargs):
    with pytest.raises(ValueError):
        _masking({"grid": (14, 14), "num_masking_patches": 75, **kwargs})


def test_no_patches_to_mask_gives_an_empty_mask():
    assert not BlockwiseMasking((14, 14), 0)(torch.Generator().manual_seed(0)).any()
