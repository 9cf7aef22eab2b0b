"""Parameter and multiply-accumulate (MAC) counts.

Convention (the papers' "FLOPs"): the ViT, DeiT, Swin, PVT, CvT, T2T and DAT tables report multiply-accumulates of
one image's forward pass, so ``count_macs`` returns FLOPs / 2 as counted by ``torch.utils.flop_counter
.FlopCounterMode``: convolutions, dense layers and matrix products, **including the two attention products**
(Q·Kᵀ and A·V, 2·N²·D per block for ViT). Softmax, LayerNorm, GELU, additions and the bias of each layer are not
counted. This reproduces ViT-B/16 = 17.56 G and DeiT-Ti⚗ = 1.26 G (the sizes of the ViT paper's Table 1 and
DeiT's Table 1, counted as timm counts them).

How the attention products are counted: ``FlopCounterMode`` has formulas for the CUDA flash/efficient kernels but not
for the CPU flash kernel that ``scaled_dot_product_attention`` dispatches to (it counts 0 there). The count therefore
runs every vitkit attention layer on its explicit softmax path (``record_attention``), whose two ``matmul`` calls are
counted on any device. Counting is fastest on the meta device: ``model_stats`` builds the model there, so no weight
is allocated and no arithmetic runs, and all registered variants are counted in seconds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitkit.layers.attention import record_attention

__all__ = ["count_params", "count_macs", "count_flops", "ModelStats", "model_stats", "stats_rows", "update"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _input_size(model: nn.Module, input_size: tuple[int, ...] | None) -> tuple[int, int, int]:
    if input_size is None:
        data_cfg = getattr(model, "data_cfg", None)
        if data_cfg is None:
            raise ValueError("pass input_size=(C, H, W): the model has no data_cfg to take it from")
        input_size = data_cfg.input_size
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {tuple(input_size)}")
    return tuple(int(s) for s in input_size)


def count_flops(model: nn.Module, input_size: tuple[int, int, int] | None = None, backward: bool = False,
                batch_size: int = 1) -> int:
    """FLOPs of ``batch_size`` images through ``model`` (forward, or forward + backward of the summed output).

    Runs on the model's device and dtype; on the meta device nothing is computed. Eval mode is used for the
    forward-only count (no dropout); the model's mode is restored afterwards.
    """
    C, H, W = _input_size(model, input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(batch_size, C, H, W, device=device, dtype=dtype)
    was_training = model.training
    model.train(backward)
    counter = FlopCounterMode(display=False)
    try:
        with record_attention(model), counter, torch.set_grad_enabled(backward):
            out = model(x)
            if backward:
                out = out[0] if isinstance(out, (tuple, list)) else out
                out.float().sum().backward()
    finally:
        model.train(was_training)
        if backward:
            model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """Multiply-accumulates of one image's forward pass (the papers' "FLOPs"; attention products included).

    ``input_size`` is (C, H, W); it defaults to ``model.data_cfg.input_size`` (the native resolution).
    """
    return count_flops(model, input_size) // 2


@dataclass(frozen=True)
class ModelStats:
    """One row of ``vitkit models``."""

    name: str
    family: str
    input_size: tuple[int, int, int]
    params: int  # parameter elements, with the default head (1000 classes)
    macs: int  # forward MACs of one image at ``input_size``

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        """GMACs, reported as "GFLOPs" by the papers."""
        return self.macs / 1e9

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["input_size"] = list(self.input_size)
        row.update(params_m=round(self.params_m, 3), gflops=round(self.gflops, 3))
        return row


def model_stats(name: str, **overrides: Any) -> ModelStats:
    """Parameters and forward MACs of a registered variant at its native resolution, built on the meta device."""
    from vitkit.registry import create_model, get_spec
    spec = get_spec(name)
    with torch.device("meta"):
        model = create_model(name, **overrides)
    input_size = model.data_cfg.input_size
    return ModelStats(name, spec.family, tuple(input_size), count_params(model), count_macs(model, input_size))


# ------------------------------------------------------------------------------------ precomputed per-family stats
def _family_folder(spec) -> Path:
    """The folder of a family: the package holding its model class."""
    import sys
    return Path(sys.modules[spec.model_cls.__module__].__file__).parent


def _fingerprint(spec) -> str:
    from vitkit.families.stats import fingerprint
    return fingerprint(spec.model_cls.__qualname__, spec.config, spec.data_cfg.input_size)


def _entry(name: str) -> dict[str, Any]:
    from vitkit.registry import get_spec
    spec = get_spec(name)
    s = model_stats(name)
    return {"params": s.params, "macs": s.macs, "input_size": list(s.input_size),
            "fingerprint": _fingerprint(spec)}


def _is_current(name: str, entry: dict[str, Any] | None) -> bool:
    from vitkit.registry import get_spec
    spec = get_spec(name)
    return entry is not None and entry.get("fingerprint") == _fingerprint(spec)


def _row(name: str, family: str, entry: dict[str, Any]) -> dict[str, Any]:
    return ModelStats(name, family, tuple(entry["input_size"]), entry["params"], entry["macs"]).as_dict()


def stats_rows(names: list[str], progress: bool = True) -> list[dict[str, Any]]:
    """``vitkit models`` rows for registered ``names``: from the stats files where current, counted on the meta
    device where an entry is missing or stale (with progress on stderr)."""
    from vitkit.families.stats import read_all
    from vitkit.progress import progress as bar_for
    from vitkit.registry import get_spec
    entries = {name: (family, entry) for family, data in read_all().items()
               for name, entry in data["variants"].items()}
    todo = [n for n in names if not _is_current(n, entries.get(n, (None, None))[1])]
    if todo:
        import logging
        logging.getLogger("vitkit").info("counting parameters and MACs of %d variant(s) without current stats "
                                         "(python -m vitkit.bench.flops --update saves them)", len(todo))
        for name in bar_for(todo, enabled=progress, total=len(todo), desc="counting", unit="model"):
            entries[name] = (get_spec(name).family, _entry(name))
    return [_row(n, entries[n][0], entries[n][1]) for n in names]


def update(families: list[str] | None = None, progress: bool = True, recount: bool = False) -> list[Path]:
    """Rewrite the stats files of ``families`` (default: every registered family), counting the variants whose
    entry is missing or stale (all of them with ``recount``); returns the files written."""
    from vitkit.families.stats import read_all, write_family
    from vitkit.progress import progress as bar_for
    from vitkit.registry import get_spec, list_models
    by_family: dict[str, list[str]] = {}
    for name in list_models():
        by_family.setdefault(get_spec(name).family, []).append(name)
    unknown = sorted(set(families or ()) - set(by_family))
    if unknown:
        raise ValueError(f"no registered family {', '.join(unknown)} (registered: {', '.join(sorted(by_family))})")
    old = {} if recount else {n: e for data in read_all().values() for n, e in data["variants"].items()}
    written = []
    for family in families or sorted(by_family):
        names = by_family[family]
        variants = {n: old[n] for n in names if _is_current(n, old.get(n))}
        todo = [n for n in names if n not in variants]
        variants.update({n: _entry(n) for n in bar_for(todo, enabled=progress, total=len(todo), desc=family,
                                                        unit="model")})
        written.append(write_family(family, _family_folder(get_spec(names[0])), variants))
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m vitkit.bench.flops",
                                     description="Precompute parameters and MACs of the registered variants into "
                                                 "vitkit/families/<family>/stats.json (read by `vitkit models`).")
    parser.add_argument("--update", nargs="*", metavar="FAMILY", required=True,
                        help="families to rewrite (default: all); entries still current are kept")
    parser.add_argument("--recount", action="store_true", help="count every variant again")
    args = parser.parse_args(argv)
    for path in update(args.update or None, recount=args.recount):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
