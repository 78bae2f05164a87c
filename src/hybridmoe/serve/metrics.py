"""``GET /metrics`` (Prometheus text format, through ``prometheus_client``) and the periodic throughput log line.

Metric names follow vLLM's, with the ``hybridmoe:`` prefix in place of ``vllm:``, so dashboards carry over:
request and token counters, time-to-first-token / inter-token-latency / end-to-end histograms, running and waiting
gauges, GPU and host memory, and the time spent in the routed experts. Each app has its own registry (several
servers can live in one process, as in the tests).

Cost: the engine calls :meth:`ServeMetrics.token` once per generated token (two histogram observations, a few
microseconds); the expert timer is a forward pre/post hook pair on each experts block (two ``perf_counter`` calls
per layer and step). On a GPU the experts run on the CPU and block the step, so their wall time is their cost.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("hybridmoe.serve")

# latency buckets (seconds) as in vLLM: fine at the low end where interactive serving lives
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


def _rss_bytes() -> float:
    """Resident set size of this process (host memory: the routed experts live here)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ServeMetrics:
    """The server's metrics, in their own registry; :meth:`render` is the ``/metrics`` body."""

    def __init__(self, engine) -> None:
        self.registry = r = CollectorRegistry()
        p = "hybridmoe:"
        self.requests = Counter(p + "request_success", "Finished requests by finish reason", ["finished_reason"],
                                registry=r)
        self.failures = Counter(p + "request_failure", "Failed requests by error code (timeout, out_of_memory, "
                                "non_finite_logits, shutting_down, internal_error)", ["code"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to the first token", buckets=_TTFT,
                              registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between two tokens of one request",
                             buckets=_ITL, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Time from arrival to the last token", buckets=_E2E,
                             registry=r)
        self.mixed_forwards = Counter(p + "mixed_adapter_forwards", "Forwards (decode steps, prefill chunks) whose "
                                      "batch rows used more than one adapter (the base model counts as one)",
                                      ["phase"], registry=r)
        self.expert_seconds = Counter(p + "expert_seconds", "Wall time in the routed-expert blocks (CPU)", registry=r)
        Gauge(p + "num_requests_running", "Requests prefilling or decoding", registry=r).set_function(
            lambda: engine.running)
        Gauge(p + "num_requests_waiting", "Requests queued for prefill", registry=r).set_function(
            lambda: engine.waiting)
        Gauge(p + "host_memory_bytes", "Resident memory of the server process", registry=r).set_function(_rss_bytes)
        if torch.cuda.is_available():
            Gauge(p + "gpu_memory_allocated_bytes", "GPU memory held by tensors", registry=r).set_function(
                torch.cuda.memory_allocated)
            Gauge(p + "gpu_memory_reserved_bytes", "GPU memory held by the caching allocator",
                  registry=r).set_function(torch.cuda.memory_reserved)
        self._hooks = []
        self.total_prompt = self.total_generated = 0  # plain totals for the log line

    # -- called by the engine's worker ------------------------------------------------------------------------------
    def prefilled(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)
        self.total_prompt += tokens

    def token(self, seconds: float, first: bool) -> None:
        """One token generated, ``seconds`` after the request arrived (``first``) or after its previous token."""
        self.generation_tokens.inc()
        self.total_generated += 1
        (self.ttft if first else self.itl).observe(seconds)

    def mixed_forward(self, phase: str) -> None:
        """One forward ran rows of several adapters together; ``phase`` is "decode" or "prefill"."""
        self.mixed_forwards.labels(phase=phase).inc()

    def finished(self, reason: str, seconds: float) -> None:
        self.requests.labels(finished_reason={"eos": "stop", "stop_string": "stop"}.get(reason, reason)).inc()
        self.e2e.observe(seconds)

    def failed(self, code: str) -> None:
        self.failures.labels(code=code).inc()

    def watch_experts(self, modules) -> None:
        """Time every forward of ``modules`` (the HybridExperts blocks) into ``hybridmoe:expert_seconds_total``."""
        def pre(module, args):
            module._hybridmoe_t0 = time.perf_counter()

        def post(module, args, output):
            self.expert_seconds.inc(time.perf_counter() - module._hybridmoe_t0)

        for m in modules:
            self._hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def log_throughput(metrics: ServeMetrics, engine, interval: float) -> None:
    """Every ``interval`` seconds while there was work, one line like vLLM's: prompt and generation tokens/s over the
    interval, running and waiting requests, host (and GPU) memory."""
    last_t, last_p, last_g = time.monotonic(), metrics.total_prompt, metrics.total_generated
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        p, g = metrics.total_prompt, metrics.total_generated
        dt = now - last_t
        if p != last_p or g != last_g or engine.running or engine.waiting:
            gpu = f", GPU memory: {torch.cuda.memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
            log.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d "
                     "reqs, Waiting: %d reqs, host memory: %.1f GiB%s", (p - last_p) / dt, (g - last_g) / dt,
                     engine.running, engine.waiting, _rss_bytes() / 2**30, gpu)
        last_t, last_p, last_g = now, p, g
