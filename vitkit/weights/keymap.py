"""Rename tables for checkpoint keys, applied in either direction, and the shared tensor steps of converters.

A ``KeyMap`` is an explicit list of rules between a source layout (timm, official, transformers) and vitkit's layout.
Rules are key *prefix templates* with numbered placeholders, e.g.
``Rename("encoder.layer.{i}.layernorm_before.", "blocks.{i}.norm1.")``; a placeholder may carry an offset,
``"layers.{i+1}.downsample."``, for layouts that number a module differently. ``Fuse`` gathers separate projections
(transformers' query/key/value) into one fused tensor (timm's qkv) and splits it back. ``KeyMap.forward`` converts a
source state dict into vitkit's layout; ``KeyMap.inverse`` writes vitkit's state dict in the source layout (what the
transformers twin of ``bench --compare`` loads), so one table serves both directions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from vitkit.weights.load_report import CheckpointError, LoadReport

__all__ = ["Rename", "Fuse", "Drop", "KeyMap", "conv_hwio_to_oihw", "dense_io_to_oi"]

_PLACEHOLDER = re.compile(r"\{(\w+)([+-]\d+)?\}")


class _Template:
    """A key prefix with ``{name}`` / ``{name+K}`` placeholders for non-negative integers."""

    def __init__(self, text: str):
        self.text = text
        self.slots: list[tuple[str, int]] = []
        pattern, pos = "", 0
        for m in _PLACEHOLDER.finditer(text):
            pattern += re.escape(text[pos:m.start()]) + r"(\d+)"
            self.slots.append((m.group(1), int(m.group(2) or 0)))
            pos = m.end()
        self.regex = re.compile(pattern + re.escape(text[pos:]))

    def match(self, key: str) -> tuple[dict[str, int], str] | None:
        """(placeholder values, the rest of the key) when ``key`` starts with this template."""
        m = self.regex.match(key)
        if m is None:
            return None
        values: dict[str, int] = {}
        for (name, offset), captured in zip(self.slots, m.groups()):
            value = int(captured) - offset
            if values.setdefault(name, value) != value or value < 0:
                return None
        return values, key[m.end():]

    def format(self, values: dict[str, int]) -> str:
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)] + int(m.group(2) or 0)), self.text)


@dataclass(frozen=True)
class Rename:
    """``src`` prefix (source layout) ↔ ``dst`` prefix (vitkit layout); the rest of the key is kept."""

    src: str
    dst: str


@dataclass(frozen=True)
class Fuse:
    """Separate source tensors ``srcs`` (e.g. query, key, value) ↔ one vitkit tensor ``dst``, concatenated along
    ``dim`` in the order given (timm's fused qkv is (q, k, v) along the output dimension)."""

    srcs: tuple[str, ...]
    dst: str
    dim: int = 0


@dataclass(frozen=True)
class Drop:
    """Source keys matching the regular expression ``pattern`` are left out, with ``why`` in the load report."""

    pattern: str
    why: str


class KeyMap:
    """An explicit, invertible table of ``Rename`` / ``Fuse`` rules (first match wins) plus ``Drop`` rules."""

    def __init__(self, rules: Sequence[Rename | Fuse | Drop], name: str = ""):
        self.name = name
        self.rules = list(rules)
        self._renames = [(_Template(r.src), _Template(r.dst)) for r in rules if isinstance(r, Rename)]
        self._fuses = [(tuple(_Template(s) for s in r.srcs), _Template(r.dst), r.dim) for r in rules
                       if isinstance(r, Fuse)]
        self._drops = [(re.compile(r.pattern), r.why) for r in rules if isinstance(r, Drop)]

    # ----------------------------------------------------------------------------------------- source → vitkit
    def forward(self, state: dict[str, Tensor], report: LoadReport | None = None) -> dict[str, Tensor]:
        """Convert a source-layout state dict into vitkit's layout; a key no rule covers is an error naming it."""
        out: dict[str, Tensor] = {}
        parts: dict[str, dict[int, Tensor]] = {}
        unknown = []
        for key, value in state.items():
            if self._dropped(key, report):
                continue
            if (new := self._rename(key, self._renames, forward=True)) is not None:
                out[new] = value
            elif (hit := self._fuse_part(key)) is not None:
                dst, index, dim = hit
                parts.setdefault(dst, {})[index] = (value, dim)
            else:
                unknown.append(f"{key} {list(value.shape)}")
        if unknown:
            source = report.source if report else "checkpoint"
            raise CheckpointError(f"{source}: {len(unknown)} key(s) not in the {self.name or 'conversion'} table: "
                                  f"{', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}")
        for dst, pieces in parts.items():
            n = self._fuse_arity(dst)
            if sorted(pieces) != list(range(n)):
                raise CheckpointError(f"{report.source if report else 'checkpoint'}: {dst} needs {n} parts to fuse, "
                                      f"found {len(pieces)}")
            dim = pieces[0][1]
            out[dst] = torch.cat([pieces[i][0] for i in range(n)], dim=dim)
        if report is not None:
            report.converted += sum(1 for k in state if not self._drop_reason(k))
        return out

    def _dropped(self, key: str, report: LoadReport | None) -> bool:
        why = self._drop_reason(key)
        if why and report is not None:
            report.ignored.append(f"{key}: {why}")
        return why is not None

    def _drop_reason(self, key: str) -> str | None:
        return next((why for regex, why in self._drops if regex.search(key)), None)

    @staticmethod
    def _rename(key: str, pairs, forward: bool) -> str | None:
        for src, dst in pairs:
            a, b = (src, dst) if forward else (dst, src)
            if (hit := a.match(key)) is not None:
                values, rest = hit
                return b.format(values) + rest
        return None

    def _fuse_part(self, key: str) -> tuple[str, int, int] | None:
        for srcs, dst, dim in self._fuses:
            for index, src in enumerate(srcs):
                if (hit := src.match(key)) is not None:
                    values, rest = hit
                    return dst.format(values) + rest, index, dim
        return None

    def _fuse_arity(self, dst_key: str) -> int:
        for srcs, dst, _ in self._fuses:
            if dst.match(dst_key) is not None:
                return len(srcs)
        raise KeyError(dst_key)

    # ----------------------------------------------------------------------------------------- vitkit → source
    def inverse(self, state: dict[str, Tensor], skip: Iterable[str] = ()) -> dict[str, Tensor]:
        """Write a vitkit state dict in the source layout (fused tensors split in order). Keys matching a regular
        expression in ``skip`` (e.g. computed buffers the source does not save) are left out."""
        skips = [re.compile(s) for s in skip]
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            if any(s.search(key) for s in skips):
                continue
            if (hit := self._split(key, value)) is not None:
                out.update(hit)
            elif (new := self._rename(key, self._renames, forward=False)) is not None:
                out[new] = value
            else:
                raise KeyError(f"{key}: no rule of the {self.name or 'conversion'} table produces it")
        return out

    def _split(self, key: str, value: Tensor) -> dict[str, Tensor] | None:
        for srcs, dst, dim in self._fuses:
            if (hit := dst.match(key)) is not None:
                values, rest = hit
                chunks = value.chunk(len(srcs), dim=dim)
                return {src.format(values) + rest: c.clone() for src, c in zip(srcs, chunks)}
        return None


# --------------------------------------------------------------------------------------------- tensor layouts
def conv_hwio_to_oihw(kernel: Tensor) -> Tensor:
    """A JAX/TF conv kernel (kh, kw, in, out) → PyTorch's (out, in, kh, kw)."""
    return kernel.permute(3, 2, 0, 1).contiguous()


def dense_io_to_oi(kernel: Tensor) -> Tensor:
    """A JAX/TF dense kernel (in, out) → ``nn.Linear``'s (out, in)."""
    return kernel.t().contiguous()
