"""Server metrics in Prometheus' text exposition format (written by hand: no extra dependency).

Names follow vLLM / llama.cpp server conventions where they exist: time to first token and time
per output token as histograms in seconds, token counters by kind. Everything is updated on the
event loop thread or under one lock, so reads are consistent.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# PrefixCache.stats keys: hits/misses/evictions only grow, so they are counters (`_total`):
# typed as gauges, Prometheus' rate() and counter-reset handling do not apply to them.
PREFIX_CACHE_STATS = {
    "entries": ("gauge", "Image prefixes held in the cache."),
    "bytes": ("gauge", "Bytes of KV state held in the cache."),
    "max_bytes": ("gauge", "The cache's byte budget (--prefix-cache-mb)."),
    "hits": ("counter", "Image prefixes restored from the cache."),
    "misses": ("counter", "Image prefixes looked up and not found."),
    "evictions": ("counter", "Image prefixes evicted to stay within the budget."),
}


class Histogram:
    """A cumulative Prometheus histogram."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [
            f'{name}_bucket{{le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.total}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.total}")
        return out


class Metrics:
    """Counters and histograms of one server process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (path, status)
        self.tokens: Counter[str] = Counter()  # prompt / visual / completion
        self.prefix_reused = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.latency = Histogram(REQUEST_BUCKETS)
        self.screenings = 0  # POST /v1/screen answered
        self.screen_answers: Counter[str] = Counter()  # answered / text / no valid answer
        self.filed: Counter[str] = Counter()  # sr / fhir files written
        self.screen_latency = Histogram(REQUEST_BUCKETS)

    def count_request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] += 1

    def observe_answer(self, *, ttft_s: float, total_s: float, answer: object) -> None:
        """One answered completion: tokens, reuse of the image prefix, TTFT, per-token decode time."""
        with self._lock:
            self.tokens["prompt"] += int(answer.n_prompt_tokens)
            self.tokens["visual"] += int(answer.n_image_tokens)
            self.tokens["completion"] += int(answer.n_generated)
            self.prefix_reused += bool(answer.cached_prefix)
            self.ttft.observe(ttft_s)
            self.latency.observe(total_s)
            generate_ms = answer.timings.get("generate_ms", 0.0)
            if answer.n_generated > 1 and generate_ms > 0:
                self.tpot.observe(generate_ms / 1000.0 / (answer.n_generated - 1))

    def observe_screening(self, *, total_s: float, result: object) -> None:
        """One answered POST /v1/screen: its tokens, answers by status, files written, duration."""
        with self._lock:
            self.screenings += 1
            self.tokens["prompt"] += int(result.usage["prompt_tokens"])
            self.tokens["visual"] += int(result.usage["visual_tokens"])
            self.tokens["completion"] += int(result.usage["completion_tokens"])
            self.prefix_reused += int(result.cached_prefixes)
            for a in result.answers:
                self.screen_answers[a.status] += 1
            self.filed["sr"] += result.sr is not None
            self.filed["fhir"] += result.fhir is not None
            self.screen_latency.observe(total_s)

    def render(
        self, gauges: dict[str, tuple[str, float]], extra: Callable[[], dict[str, int]] | None = None
    ) -> str:
        """The exposition text. gauges: name -> (help, value) read by the caller at scrape time."""
        with self._lock:
            out = [
                "# HELP eyecare_requests_total HTTP requests by path and status code.",
                "# TYPE eyecare_requests_total counter",
            ]
            for (path, status), n in sorted(self.requests.items()):
                out.append(f'eyecare_requests_total{{path="{_escape(path)}",code="{status}"}} {n}')
            out += [
                "# HELP eyecare_errors_total HTTP responses with a 4xx or 5xx status, by code.",
                "# TYPE eyecare_errors_total counter",
            ]
            errors: Counter[int] = Counter()
            for (_, status), n in self.requests.items():
                if status >= 400:
                    errors[status] += n
            for status, n in sorted(errors.items()):
                out.append(f'eyecare_errors_total{{code="{status}"}} {n}')
            out += [
                "# HELP eyecare_tokens_total Tokens of answered completions by kind "
                "(visual tokens are part of prompt tokens).",
                "# TYPE eyecare_tokens_total counter",
            ]
            for kind in ("prompt", "visual", "completion"):
                out.append(f'eyecare_tokens_total{{kind="{kind}"}} {self.tokens[kind]}')
            out += [
                "# HELP eyecare_image_prefix_reused_total Completions whose image prefix was reused.",
                "# TYPE eyecare_image_prefix_reused_total counter",
                f"eyecare_image_prefix_reused_total {self.prefix_reused}",
            ]
            for name, help_, hist in (
                (
                    "eyecare_time_to_first_token_seconds",
                    "Request arrival to first generated token.",
                    self.ttft,
                ),
                (
                    "eyecare_time_per_output_token_seconds",
                    "Decode time per generated token after the first.",
                    self.tpot,
                ),
                ("eyecare_request_duration_seconds", "Request arrival to the last token.", self.latency),
                (
                    "eyecare_screen_duration_seconds",
                    "POST /v1/screen arrival to the filed results.",
                    self.screen_latency,
                ),
            ):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *hist.lines(name)]
            out += [
                "# HELP eyecare_screenings_total Screening requests answered (POST /v1/screen).",
                "# TYPE eyecare_screenings_total counter",
                f"eyecare_screenings_total {self.screenings}",
                "# HELP eyecare_screen_answers_total Protocol answers by status.",
                "# TYPE eyecare_screen_answers_total counter",
            ]
            for status, n in sorted(self.screen_answers.items()):
                out.append(f'eyecare_screen_answers_total{{status="{_escape(status)}"}} {n}')
            out += [
                "# HELP eyecare_filed_total Result files written by kind (DICOM SR, FHIR Bundle).",
                "# TYPE eyecare_filed_total counter",
            ]
            for kind in ("sr", "fhir"):
                out.append(f'eyecare_filed_total{{kind="{kind}"}} {self.filed[kind]}')
        for name, (help_, value) in gauges.items():
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        if extra is not None:
            for key, value in extra().items():
                kind, help_ = PREFIX_CACHE_STATS.get(key, ("gauge", f"Image-prefix cache {key}."))
                name = f"eyecare_prefix_cache_{key}" + ("_total" if kind == "counter" else "")
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = ["Histogram", "Metrics"]
