"""Every Prometheus metric, defined once. Names follow vLLM's where the meaning is the same
(``vllm:`` → ``aegaeon:``); the rest are what only this system has (switches, quotas, α).

Each service exposes the default registry at ``/metrics`` (the gateway on its HTTP port, the
others through ``serve_metrics(port)``).
"""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip

# ---- gateway: request latencies as the client sees them
TIME_TO_FIRST_TOKEN = Histogram(
    "aegaeon:time_to_first_token_seconds", "Arrival to first token.", ["model_name"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
TIME_PER_OUTPUT_TOKEN = Histogram(
    "aegaeon:time_per_output_token_seconds", "(e2e − TTFT) / (output tokens − 1).",
    ["model_name"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip
INTER_TOKEN_LATENCY = Histogram(
    "aegaeon:inter_token_latency_seconds", "Gap between consecutive tokens.", ["model_name"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
E2E_REQUEST_LATENCY = Histogram(
    "aegaeon:e2e_request_latency_seconds", "Arrival to last token.", ["model_name"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
REQUEST_SUCCESS = Counter(
    "aegaeon:request_success",
    "Submitted requests that ended without an error, by finish reason: stop, length, or abort "
    "(the client cancelled or went away first), as vLLM counts them.",
    ["model_name", "finished_reason"],
)
REQUEST_ERRORS = Counter("aegaeon:request_errors", "Requests refused or failed.", ["status"])
PROMPT_TOKENS = Counter("aegaeon:prompt_tokens", "Prefilled prompt tokens.", ["model_name"])
GENERATION_TOKENS = Counter("aegaeon:generation_tokens", "Generated tokens.", ["model_name"])

# ---- scheduler: queues and the token-level policy
NUM_REQUESTS_RUNNING = Gauge("aegaeon:num_requests_running", "Requests decoding.", ["model_name"])
NUM_REQUESTS_WAITING = Gauge(
    "aegaeon:num_requests_waiting", "Requests waiting for their first token.", ["model_name"]
)
TURN_QUOTA = Histogram(
    "aegaeon:turn_quota_seconds", "Time quota given to a decode turn.", ["model_name"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
ROUND_ALPHA = Gauge("aegaeon:round_alpha", "α of the last weighted round-robin round.")
REQUEST_QUEUE_TIME = Histogram(
    "aegaeon:request_queue_time_seconds", "Submit to first dispatch to a worker.", ["model_name"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
TURNS_DISPATCHED = Counter(
    "aegaeon:turns_dispatched", "RunTurn commands sent to workers.", ["model_name"]
)
SCHEDULER_IS_LEADER = Gauge(
    "aegaeon:scheduler_is_leader",
    "1 while this scheduler holds the leader lease and schedules; 0 while it stands by.",
)

# ---- worker: engine, memory and switching
KV_CACHE_USAGE = Gauge("aegaeon:kv_cache_usage_perc", "Device KV blocks in use (0..1).", ["worker"])
NUM_PREEMPTIONS = Counter(
    "aegaeon:num_preemptions", "Requests whose KV left the device mid-request.", ["model_name"]
)
MODEL_SWITCHES = Counter("aegaeon:model_switches", "Resident-model switches.", ["model_name"])
MODEL_SWITCH_LATENCY = Histogram(
    "aegaeon:model_switch_latency_seconds", "Time to make a model resident.", ["model_name"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
MODEL_SWITCH_BYTES = Counter(
    "aegaeon:model_switch_bytes",
    "Weight bytes copied for switches: 'waited' while the turn waited, 'prefetched' in the "
    "background before the switch.",
    ["model_name", "phase"],
)
RESIDENT_MODELS = Gauge(
    "aegaeon:resident_models", "1 while the model is resident on the worker, else 0.",
    ["worker", "model_name"],
)  # fmt: skip
KV_SWAP_BYTES = Counter("aegaeon:kv_swap_bytes", "KV bytes moved.", ["direction"])
KV_HANDOFF = Histogram(
    "aegaeon:kv_handoff_seconds",
    "Prefill → decode KV hand-off: time for the decode worker to import the exported KV "
    "(mapped on one node, fetched from the source's transfer server across nodes).",
    ["model_name"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip
ENGINE_STEP = Histogram(
    "aegaeon:engine_step_seconds", "One engine step.", ["model_name"], buckets=_LATENCY_BUCKETS
)
GPU_UTILIZATION = Gauge("aegaeon:gpu_utilization_perc", "GPU utilization (NVML).", ["gpu"])
GPU_MEMORY_USED = Gauge("aegaeon:gpu_memory_used_bytes", "GPU memory used (NVML).", ["gpu"])
ENERGY = Counter(
    "aegaeon:energy_joules",
    "GPU energy (NVML) spent in the model's turns on this worker, its switches included.",
    ["model_name"],
)
ENERGY_PER_OUTPUT_TOKEN = Gauge(
    "aegaeon:energy_per_output_token_joules",
    "GPU energy (NVML) of the model's turns on this worker / the output tokens they produced.",
    ["model_name"],
)

# ---- model-store: host cache
HOST_CACHE_HITS = Counter("aegaeon:host_cache_hits", "Ensure-cached requests already cached.")
HOST_CACHE_MISSES = Counter("aegaeon:host_cache_misses", "Ensure-cached requests that loaded.")
HOST_CACHE_BYTES = Gauge("aegaeon:host_cache_bytes", "Bytes of weights in the host cache.")
HOST_CACHE_ENSURE = Histogram(
    "aegaeon:host_cache_ensure_seconds", "Time to answer an ensure-cached request.",
    ["model_name", "result"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip
REGISTERED_MODELS = Gauge("aegaeon:registered_models", "Models in the model-store's registry.")


_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def series_names() -> set[str]:
    """Every series name this module exports (a counter as ``<name>_total``, a histogram as
    ``<name>_bucket|_sum|_count``…): what a dashboard or an alert may query."""
    names: set[str] = set()
    for value in globals().values():
        if isinstance(value, MetricWrapperBase):
            kind, name = str(value._type), str(value._name)  # type: ignore[attr-defined]
            names |= {name + suffix for suffix in _SERIES_SUFFIXES[kind]}
    return names


class _TextFormat(BaseHTTPRequestHandler):
    """``GET /metrics`` in the text format 0.0.4, whatever the scraper's Accept header says.

    prometheus_client's own server negotiates: a Prometheus asking for OpenMetrics first (all
    2.x do) gets names escaped to underscores, so ``aegaeon:model_switches_total`` would be
    stored as ``aegaeon_model_switches_total`` and every query of the dashboard would miss. The
    gateway's route serves the same format."""

    def do_GET(self) -> None:  # the name http.server dispatches to
        if self.path.split("?")[0] not in ("/", "/metrics"):
            self.send_error(404)
            return
        body = generate_latest()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every few seconds is not news


def serve_metrics(port: int) -> ThreadingHTTPServer | None:
    """Expose ``/metrics`` on ``port`` (0: do nothing) from a background thread, on
    ``AEGAEON_METRICS_ADDR`` (default loopback: a scraper on another host or container needs it
    set, as compose and Kubernetes do). Returns the server (``shutdown()`` stops it)."""
    if not port:
        return None
    server = ThreadingHTTPServer((os.environ.get("AEGAEON_METRICS_ADDR") or "127.0.0.1", port),
                                 _TextFormat)  # fmt: skip
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


_nvml_state: dict[str, bool] = {}


def _nvml_ready() -> bool:
    """Initialise NVML once per process (False for good when there is no NVIDIA driver)."""
    if "ok" not in _nvml_state:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_state["ok"] = True
        except Exception:
            _nvml_state["ok"] = False
    return _nvml_state["ok"]


def sample_gpus(indices: list[int] | None = None) -> None:
    """Refresh the NVML gauges (of ``indices``, default every GPU); silently nothing on a
    machine without an NVIDIA GPU. Utilization is a percentage (0..100), as NVML reports it."""
    if not _nvml_ready():
        return
    import pynvml

    try:
        wanted = indices if indices is not None else range(pynvml.nvmlDeviceGetCount())
        for index in wanted:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            GPU_UTILIZATION.labels(str(index)).set(rates.gpu)
            GPU_MEMORY_USED.labels(str(index)).set(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except pynvml.NVMLError:
        pass  # a GPU fell off the bus or is in a reset: the next sample tries again


def scrape_targets(ports: dict[str, int], host: str = "127.0.0.1") -> list[dict]:
    """Prometheus file-based service discovery entries (``file_sd_configs``), one per service,
    labelled ``service``: what ``aegaeon up`` writes so a local Prometheus finds every /metrics."""
    return [
        {"targets": [f"{host}:{port}"], "labels": {"service": name}}
        for name, port in sorted(ports.items())
    ]
