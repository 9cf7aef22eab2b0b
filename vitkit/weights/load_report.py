"""What a checkpoint load did: the format it recognised and every change it made on the way in."""
from __future__ import annotations

from dataclasses import dataclass, field

from vitkit.specs import ResizeRule

__all__ = ["LoadReport", "CheckpointError", "UnsafeCheckpointError", "CheckpointMismatchError"]


class CheckpointError(ValueError):
    """A checkpoint could not be read (missing, truncated, corrupt or of an unknown format)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint needs arbitrary code to unpickle; vitkit refuses it without running anything."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model and the difference cannot be explained."""


@dataclass
class LoadReport:
    source: str
    format: str = "unknown"  # vitkit | timm | official | hf | jax
    container: str = ""  # e.g. "{'model': state_dict}"
    converted: int = 0  # tensors renamed or reshaped by the format converter
    upcast: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source_config: dict = field(default_factory=dict)  # architecture hints the checkpoint carried (e.g. img_size)
    origin: str = ""  # the code that wrote the file, when the format tells (JAX: "vit_jax" or "big_vision")
    resize: ResizeRule | None = None  # how this source's tables are resized (set by create_model); None: no rule

    def summary(self) -> str:
        lines = [f"loaded {self.source} ({self.format}{', ' + self.container if self.container else ''}"
                 f"{f', {self.converted} tensors converted' if self.converted else ''})"]
        for title, items in (("upcast", self.upcast), ("resized", self.resized),
                             ("re-initialised", self.reinitialized), ("ignored", self.ignored), ("note", self.notes)):
            lines += [f"  {title}: {item}" for item in items]
        return "\n".join(lines)
