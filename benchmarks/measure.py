"""Latency measures: an HDR histogram each, with the raw samples kept for the plots."""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

#: Histogram range in microseconds: 1 µs to 10 minutes at 3 significant digits.
_LOWEST_US = 1
_HIGHEST_US = 600_000_000
_DIGITS = 3

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
#: A measure's samples are cut, in the order they were taken, into at most this many consecutive chunks of at least
#: CHUNK_MIN samples each; the spread of the chunks' percentiles is the run's own noise, which ``compare`` bootstraps.
#: 10,000 calls make 20 chunks of 500 (the client loop's blocks); 20 kubelet restarts make 5 chunks of 4.
CHUNKS = 20
CHUNK_MIN = 4
#: The percentiles recorded per chunk.
CHUNK_PERCENTILES = (50.0, 99.0)


@dataclass
class Latencies:
    """One measure (an RPC, an admission, a health delay): its histogram, samples over time and errors."""

    name: str
    origin_s: float
    """``time.perf_counter()`` of the run's start: sample times are seconds after it."""
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS))
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the run began, latency in seconds) per call."""
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    """Time the calls took together, for throughput; 0 where calls were spread over other work."""

    def record(self, started_s: float, elapsed_s: float) -> None:
        """One call that began at ``started_s`` (perf_counter) and took ``elapsed_s``."""
        self.histogram.record_value(min(max(round(elapsed_s * 1e6), _LOWEST_US), _HIGHEST_US))
        self.samples.append((started_s - self.origin_s, elapsed_s))

    def error(self, exc: BaseException) -> None:
        self.errors[f"{type(exc).__name__}: {exc}"[:200]] += 1

    @property
    def count(self) -> int:
        return int(self.histogram.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        return float(self.histogram.get_value_at_percentile(percentile)) / 1000

    def summary(self) -> dict[str, Any]:
        """Counts, percentiles, max and mean in milliseconds, throughput per second where it means something."""
        count = self.count
        summary: dict[str, Any] = {"count": count, "errors": sum(self.errors.values())}
        if count:
            for p in PERCENTILES:
                summary[f"p{p:g}_ms"] = self.percentile_ms(p)
            summary["max_ms"] = float(self.histogram.get_max_value()) / 1000
            summary["mean_ms"] = float(self.histogram.get_mean_value()) / 1000
        if self.wall_s > 0:
            summary["wall_s"] = self.wall_s
            summary["throughput_per_s"] = count / self.wall_s
        if self.errors:
            summary["error_messages"] = dict(self.errors.most_common(5))
        chunks = self.chunks()
        if chunks:
            summary["chunks"] = chunks
        return summary

    def chunks(self) -> dict[str, list[float]]:
        """``{"p50_ms": [...], "p99_ms": [...]}``: each percentile of each chunk of consecutive samples; empty
        where there are too few samples for two chunks."""
        count = min(CHUNKS, len(self.samples) // CHUNK_MIN)
        if count < 2:
            return {}
        ordered = [s * 1000 for _, s in sorted(self.samples)]
        bounds = [round(i * len(ordered) / count) for i in range(count + 1)]
        pieces = [sorted(ordered[a:b]) for a, b in itertools.pairwise(bounds)]
        return {f"p{p:g}_ms": [round(nearest_rank(piece, p), 4) for piece in pieces] for p in CHUNK_PERCENTILES}


def nearest_rank(ordered: list[float], percentile: float) -> float:
    """The nearest-rank percentile of sorted values."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(percentile / 100 * len(ordered)) - 1))]


class Clock:
    """The run's time origin, shared by every measure, so plots line up."""

    def __init__(self) -> None:
        self.origin_s = time.perf_counter()

    def now(self) -> float:
        """Seconds since the run began."""
        return time.perf_counter() - self.origin_s

    def latencies(self, name: str) -> Latencies:
        return Latencies(name, self.origin_s)
