"""What a shard build read, wrote and skipped, and why: :class:`BuildReport`, saved as
``report.json`` beside the manifest and printed at the end of ``shards build``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from maskdist.shards.crop import describe_crop
from maskdist.shards.format import CROP, REPORT


@dataclass
class BuildReport:
    """What the build read, wrote and skipped (and why). Saved as ``report.json``."""

    out: str
    read: int = 0
    written: int = 0
    skipped: list[dict] = field(default_factory=list)  # {split, relpath, path, reason, why}
    layout: dict | None = None
    eval_layout: dict | None = None
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    crop: dict | None = None  # with --crop face: the policy, photos without a face, the lowest scores

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.skipped).items()))

    def to_dict(self) -> dict:
        return {
            "out": self.out, "read": self.read, "written": self.written,
            "skipped": len(self.skipped), "skipped_by_reason": self.skipped_by_reason(),
            "skipped_files": self.skipped, "shards": self.shards, "bytes": self.bytes,
            "seconds": round(self.seconds, 3), "layout": self.layout, "eval_layout": self.eval_layout,
        } | ({CROP: self.crop} if self.crop is not None else {})

    def describe(self, limit: int = 20) -> str:
        rate = self.read / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"wrote {self.out}: {self.shards} shards, {self.written} samples, {human_bytes(self.bytes)}"
            f" ({self.read} images read in {self.seconds:.1f} s, {rate:.0f} img/s)",
            f"  read {self.read}, written {self.written}, skipped {len(self.skipped)}",
        ]
        for reason, n in self.skipped_by_reason().items():
            lines.append(f"  skipped ({reason}): {n}")
        for s in self.skipped[:limit]:
            lines.append(f"    {s['split']} {s['relpath']}: {s['reason']}: {s['why']}")
        if len(self.skipped) > limit:
            lines.append(f"    ... and {len(self.skipped) - limit} more (all are in {REPORT})")
        if self.crop is not None:
            lines += describe_crop(self.crop, limit)
        for name, layout in (("train", self.layout), ("eval", self.eval_layout)):
            if layout and layout.get("problems"):
                counts = ", ".join(f"{k} {v}" for k, v in sorted(layout.get("counts", {}).items()))
                lines.append(f"  layout problems ({name}): {counts}")
                for p in layout["problems"][:limit]:
                    lines.append(f"    {p['kind']}: {p['where']}: {p['why']}")
                if len(layout["problems"]) > limit:
                    lines.append(f"    ... and {len(layout['problems']) - limit} more (all are in {REPORT})")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
