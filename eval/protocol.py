"""The protocol: everything an FD number depends on, stored beside every result.

Two numbers are comparable only when they share a protocol: the feature extractor and its layer,
the identity of its weights, the resize convention, how float images become uint8, the number of
generated images ``n`` and the reference. Seeds are recorded but may differ (repeats over disjoint
seed ranges are the point of recording them). ``Protocol.check_comparable`` raises
``ProtocolMismatch`` naming every field that differs.

Quantisation is EDM's (``generate.py``): ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` for
``x`` in ``[-1, 1]``; the cast truncates, so this rounds half up (``fewstep.io.to_uint8``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Protocol", "ProtocolMismatch", "EDM_UINT8", "FEATURE_FIELDS"]

#: The name of EDM's quantisation of ``[-1, 1]`` floats, as stored in ``Protocol.quantisation``.
EDM_UINT8 = "edm-uint8[-1,1]"

#: Fields that fix the feature space: statistics must agree on these before a distance is taken.
FEATURE_FIELDS = ("extractor", "layer", "weights", "resize", "quantisation")


class ProtocolMismatch(ValueError):
    """Two results (or a result and a reference) were computed under different protocols."""


@dataclass(frozen=True)
class Protocol:
    """What a number depends on. ``seeds`` is ``(start, stop)`` (half-open) for generated images,
    ``None`` for data; ``reference`` names the reference statistics an FD was taken against."""

    extractor: str = "inception-v3-compat"
    layer: str = "2048"
    weights: str = "inception-2015-12-05"
    resize: str = "tf1-bilinear-299"
    quantisation: str = EDM_UINT8
    n: int = 0
    seeds: tuple[int, int] | None = None
    reference: str = ""

    def replace(self, **changes) -> "Protocol":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "Protocol", fields: tuple[str, ...] | None = None) -> list[str]:
        """``["n: 100 != 200", ...]`` over ``fields`` (default: all but ``seeds``)."""
        if fields is None:
            fields = tuple(f.name for f in dataclasses.fields(self) if f.name != "seeds")
        return [f"{f}: {getattr(self, f)!r} != {getattr(other, f)!r}"
                for f in fields if getattr(self, f) != getattr(other, f)]

    def check_same_features(self, other: "Protocol", what: str = "statistics") -> None:
        """Raise ``ProtocolMismatch`` unless both live in the same feature space (``FEATURE_FIELDS``)."""
        diff = self.differences(other, FEATURE_FIELDS)
        if diff:
            raise ProtocolMismatch(f"{what} were computed under different feature protocols ({'; '.join(diff)}); "
                                   "a distance between them means nothing")

    def check_comparable(self, other: "Protocol") -> None:
        """Raise ``ProtocolMismatch`` unless two results may be compared (every field but ``seeds``)."""
        diff = self.differences(other)
        if diff:
            raise ProtocolMismatch(f"results computed under different protocols cannot be compared: {'; '.join(diff)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds) if self.seeds is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Protocol":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown protocol field(s) {unknown}")
        d = dict(d)
        if d.get("seeds") is not None:
            d["seeds"] = tuple(int(s) for s in d["seeds"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """One line for logs and table footers (``N`` only when it is known: ``n > 0``)."""
        seeds = f", seeds {self.seeds[0]}..{self.seeds[1] - 1}" if self.seeds else ""
        ref = f", reference {self.reference}" if self.reference else ""
        n = f", N={self.n}" if self.n else ""  # 0: not a count (a feature space, or a bare .npz)
        return (f"{self.extractor}[{self.layer}] weights {self.weights}, resize {self.resize}, "
                f"{self.quantisation}{n}{seeds}{ref}")
