"""Training health: GPU signals through NVML, training metrics, Prometheus and TensorBoard, and the warnings the
release learned to act on (SYSTEM.md §11.3).

NVML comes from the `nvidia-ml-py` package (module `pynvml`). Where it is missing or finds no GPU, the monitor says so
once, plainly, and still serves the training metrics. Thresholds: hot above ~75-78 °C (instability, throttling);
memory stuck near 5 GiB at start (reboot the node); any XID error; a PCIe replay burst (precedes a crash).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

log = logging.getLogger("krea2.health")

GIB = 1024**3
# bf16 dense peak FLOP/s per GPU, for MFU; matched against the NVML/CUDA device name
PEAK_BF16_FLOPS = {"B200": 2.25e15, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 70e12, "RTX 4090": 165e12}
THROTTLE_NAMES = {0x4: "sw power cap", 0x8: "hw slowdown", 0x20: "sw thermal", 0x40: "hw thermal",
                  0x80: "hw power brake"}  # idle, app clocks, sync boost and display are normal, not reported


@dataclass
class HealthConfig:
    port: int | None = None  # Prometheus endpoint; each local rank serves on port + local_rank
    gpu_every: int = 10  # read NVML every N steps (a read costs ~1 ms per field)
    warn_temp_c: float = 75.0
    stuck_mem_gib: tuple[float, float] = (3.0, 7.0)  # memory that sits in this band at start means a bad node
    stuck_after_steps: int = 20
    pcie_replay_burst: int = 10  # new replays between two reads


@dataclass
class GpuSample:
    index: int
    name: str = ""
    temperature_c: float | None = None
    memory_used_bytes: int | None = None
    utilization: float | None = None  # 0..1, "kernel running" time: misleading on its own, kept for context
    tensor_active: float | None = None  # 0..1, tensor-core activity (GPM, Hopper+): the best health signal
    xid_errors: list[int] = field(default_factory=list)  # XIDs seen since the last read
    pcie_replay: int | None = None  # cumulative counter
    throttle_reasons: int = 0  # NVML clocks-event bitmask
    remapped_rows_pending: bool = False


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def dit_train_flops(cfg, n_img: int, n_txt: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one sample through the DiT: matmuls and attention."""
    from krea2.models.dit import swiglu_hidden

    def block_flops(d, heads, kvheads, seq, tokens):
        kv = d // heads * kvheads
        params = 3 * d * d + 2 * d * kv + 3 * d * swiglu_hidden(d, cfg.multiplier)
        return 2 * tokens * params + 4 * tokens * seq * d  # linears + (QK^T and AV)

    D, L = cfg.features, n_img + n_txt
    f = cfg.layers * block_flops(D, cfg.heads, cfg.kvheads, L, L)
    f += cfg.txtblocks * block_flops(cfg.txtdim, cfg.txtheads, cfg.txtkvheads, cfg.txtlayers, n_txt * cfg.txtlayers)
    f += cfg.txtblocks * block_flops(cfg.txtdim, cfg.txtheads, cfg.txtkvheads, n_txt, n_txt)
    f += 2 * n_img * 2 * cfg.token_dim * D + 2 * n_txt * (cfg.txtdim * D + D * D)  # first/last, txtmlp
    return 3.0 * f


# ---------------------------------------------------------------- NVML


class NvmlReader:
    """Reads the GPUs NVML sees; `available` is False (and `reason` says why) where there are none."""

    def __init__(self, indices: list[int] | None = None):
        self.available, self.reason, self.handles = False, "", []
        self._events = None
        self._gpm_prev: dict[int, object] = {}
        try:
            import pynvml
        except ImportError:
            self.reason = "the nvidia-ml-py package is not installed"
            return
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as e:
            self.reason = f"NVML did not start ({e}): no NVIDIA driver or GPU on this machine"
            return
        if count == 0:
            self.reason = "NVML found no GPU"
            return
        indices = [i for i in (indices if indices is not None else range(count)) if i < count]
        self.handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
        self.available = bool(self.handles)
        self._register_xid_events()

    def _register_xid_events(self) -> None:
        nv = self.nvml
        try:
            self._events = nv.nvmlEventSetCreate()
            for _, h in self.handles:
                nv.nvmlDeviceRegisterEvents(h, nv.nvmlEventTypeXidCriticalError, self._events)
        except nv.NVMLError as e:  # needs root on some systems; report XIDs as unknown rather than fail
            log.info("XID events unavailable: %s", e)
            self._events = None

    def _drain_xids(self) -> dict[int, list[int]]:
        found: dict[int, list[int]] = {}
        if self._events is None:
            return found
        nv = self.nvml
        by_handle = {ctypes_addr(h): i for i, h in self.handles}
        while True:
            try:
                ev = nv.nvmlEventSetWait_v2(self._events, 0)
            except nv.NVMLError:  # NVML_ERROR_TIMEOUT: no more pending events
                return found
            found.setdefault(by_handle.get(ctypes_addr(ev.device), -1), []).append(int(ev.eventData))

    def _tensor_active(self, i: int, h) -> float | None:
        """Tensor-core activity between this read and the previous one (GPM metrics, Hopper and newer)."""
        nv = self.nvml
        try:
            sample = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(h, sample)
        except (nv.NVMLError, AttributeError):
            return None
        prev, self._gpm_prev[i] = self._gpm_prev.get(i), sample
        if prev is None:
            return None
        try:
            mg = nv.c_nvmlGpmMetricsGet_t()
            mg.version, mg.numMetrics, mg.sample1, mg.sample2 = nv.NVML_GPM_METRICS_GET_VERSION, 1, prev, sample
            mg.metrics[0].metricId = nv.NVML_GPM_METRIC_ANY_TENSOR_UTIL
            nv.nvmlGpmMetricsGet(mg)
            return float(mg.metrics[0].value) / 100.0
        except (nv.NVMLError, AttributeError):
            return None
        finally:
            nv.nvmlGpmSampleFree(prev)

    def read(self) -> list[GpuSample]:
        if not self.available:
            return []
        nv, out, xids = self.nvml, [], self._drain_xids()

        def get(fn, *args):
            try:
                return fn(*args)
            except (nv.NVMLError, AttributeError):
                return None

        for i, h in self.handles:
            s = GpuSample(index=i, name=str(get(nv.nvmlDeviceGetName, h) or ""))
            s.temperature_c = get(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            mem = get(nv.nvmlDeviceGetMemoryInfo, h)
            s.memory_used_bytes = None if mem is None else int(mem.used)
            util = get(nv.nvmlDeviceGetUtilizationRates, h)
            s.utilization = None if util is None else util.gpu / 100.0
            s.tensor_active = self._tensor_active(i, h)
            s.pcie_replay = get(nv.nvmlDeviceGetPcieReplayCounter, h)
            s.throttle_reasons = int(get(nv.nvmlDeviceGetCurrentClocksEventReasons, h) or 0)
            rows = get(nv.nvmlDeviceGetRemappedRows, h)  # (corrected, uncorrected, pending, failure)
            s.remapped_rows_pending = bool(rows and (rows[2] or rows[3]))
            s.xid_errors = xids.get(i, [])
            out.append(s)
        return out


def ctypes_addr(handle) -> int:
    import ctypes

    return ctypes.cast(handle, ctypes.c_void_p).value or 0


# ---------------------------------------------------------------- warnings


@dataclass
class _History:
    first_mem: dict[int, int] = field(default_factory=dict)
    last_replay: dict[int, int] = field(default_factory=dict)
    stuck_checked: bool = False


def health_warnings(samples: list[GpuSample], step: int, cfg: HealthConfig, hist: _History) -> list[str]:
    """The release's rules over one read of every GPU; `hist` carries what a rule needs from earlier reads."""
    out = []
    for s in samples:
        g = f"GPU {s.index}"
        if s.temperature_c is not None and s.temperature_c >= cfg.warn_temp_c:
            out.append(f"{g} at {s.temperature_c:.0f} C (>= {cfg.warn_temp_c:.0f}): expect throttling and instability")
        for xid in s.xid_errors:
            out.append(f"{g} XID {xid}: hardware/driver error, drain this node")
        if s.remapped_rows_pending:
            out.append(f"{g} has pending or failed row remaps: bad HBM, drain this node")
        if s.pcie_replay is not None:
            prev = hist.last_replay.get(s.index)
            if prev is not None and s.pcie_replay - prev >= cfg.pcie_replay_burst:
                out.append(f"{g} PCIe replay burst (+{s.pcie_replay - prev}): often precedes a crash")
            hist.last_replay[s.index] = s.pcie_replay
        bad = [name for bit, name in THROTTLE_NAMES.items() if s.throttle_reasons & bit]
        if bad:
            out.append(f"{g} throttled: {', '.join(bad)}")
        if s.memory_used_bytes is not None:
            hist.first_mem.setdefault(s.index, s.memory_used_bytes)
    if not hist.stuck_checked and step >= cfg.stuck_after_steps:
        hist.stuck_checked = True
        lo, hi = cfg.stuck_mem_gib
        for s in samples:
            first = hist.first_mem.get(s.index)
            used = s.memory_used_bytes
            if used is not None and first is not None and lo * GIB <= used <= hi * GIB and abs(used - first) < GIB / 4:
                out.append(f"GPU {s.index} memory stuck at {used / GIB:.1f} GiB since start: reboot the node")
    return out


# ---------------------------------------------------------------- the monitor


class HealthMonitor:
    """Feed it each step: `monitor.log_step(step, loss=..., grad_norm=..., step_time_s=..., tokens=..., mfu=...)`.

    Training metrics go to TensorBoard on rank 0 (pass a SummaryWriter there, None elsewhere) and to Prometheus on
    every rank that has a port. GPU health is read every `gpu_every` steps; warnings are logged and returned.
    """

    def __init__(self, cfg: HealthConfig | None = None, writer=None, rank: int = 0, local_rank: int = 0,
                 gpu_indices: list[int] | None = None, reader: NvmlReader | None = None,
                 tensorboard_skip: tuple[str, ...] = ()):
        self.cfg = cfg or HealthConfig()
        self.tensorboard_skip = tensorboard_skip  # metrics the caller already writes to TensorBoard itself
        self.writer, self.rank, self.local_rank = writer, rank, local_rank
        self.reader = reader if reader is not None else NvmlReader(gpu_indices)
        self.hist = _History()
        self.warnings: list[str] = []
        self.server = None
        self._init_prometheus()
        if not self.reader.available:
            msg = f"GPU health: no NVIDIA GPU ({self.reader.reason}); GPU metrics are off, training metrics still on"
            (log.warning if rank == 0 else log.info)(msg)
            self.status = msg
        else:
            self.status = f"GPU health: watching {len(self.reader.handles)} GPU(s) through NVML"

    def _init_prometheus(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        r = self.registry = CollectorRegistry()  # own registry: several monitors (tests, ranks) never collide
        self.g = {name: Gauge(f"krea2_{name}", doc, registry=r) for name, doc in [
            ("step", "optimizer step"), ("loss", "training loss (mean over ranks)"), ("grad_norm", "gradient norm"),
            ("step_time_seconds", "wall time of the last step"), ("tokens_per_second", "image+text tokens per s"),
            ("mfu", "model FLOPs utilisation, 0..1"), ("gpu_available", "1 when NVML sees a GPU")]}
        self.bad_steps = Counter("krea2_bad_steps", "steps skipped or rolled back by the guard", registry=r)
        gpu = [("temperature_celsius", "GPU temperature"), ("memory_used_bytes", "GPU memory used"),
               ("utilization_ratio", "GPU busy time (misleading alone)"),
               ("tensor_active_ratio", "tensor-core activity, the best health signal"),
               ("pcie_replay", "PCIe replay counter (cumulative)"), ("throttle_reasons", "NVML clocks-event bitmask")]
        self.gpu_g = {name: Gauge(f"krea2_gpu_{name}", doc, ["gpu"], registry=r) for name, doc in gpu}
        self.xid = Counter("krea2_gpu_xid_errors", "XID errors seen", ["gpu"], registry=r)
        if self.cfg.port is not None:
            from prometheus_client import start_http_server

            self.server, _ = start_http_server(self.cfg.port + self.local_rank, registry=r)

    @property
    def port(self) -> int | None:
        return None if self.server is None else self.server.server_port

    def log_step(self, step: int, **metrics: float | None) -> list[str]:
        """Record step metrics (loss, grad_norm, step_time_s, tokens_per_s, mfu, ...); returns new warnings."""
        self.g["step"].set(step)
        names = {"step_time_s": "step_time_seconds", "tokens_per_s": "tokens_per_second"}
        for k, v in metrics.items():
            if v is None:
                continue
            v = float(v)
            if k in names or k in self.g:
                self.g[names.get(k, k)].set(v)
            if self.writer is not None and math.isfinite(v) and k not in self.tensorboard_skip:
                self.writer.add_scalar(f"train/{k}", v, step)
        new = self.check_gpus(step) if step % self.cfg.gpu_every == 0 else []
        return new

    def record_bad_step(self, step: int, reason: str) -> None:
        self.bad_steps.inc()
        if self.writer is not None:
            self.writer.add_scalar("train/bad_steps", self.bad_steps._value.get(), step)
        log.warning("step %d: %s", step, reason)

    def check_gpus(self, step: int) -> list[str]:
        self.g["gpu_available"].set(1 if self.reader.available else 0)
        samples = self.reader.read()
        for s in samples:
            gi = str(s.index)
            for name, v in (("temperature_celsius", s.temperature_c), ("memory_used_bytes", s.memory_used_bytes),
                            ("utilization_ratio", s.utilization), ("tensor_active_ratio", s.tensor_active),
                            ("pcie_replay", s.pcie_replay), ("throttle_reasons", s.throttle_reasons)):
                if v is not None:
                    self.gpu_g[name].labels(gi).set(v)
            if s.xid_errors:
                self.xid.labels(gi).inc(len(s.xid_errors))
            if self.writer is not None:
                mem_gib = None if s.memory_used_bytes is None else s.memory_used_bytes / GIB
                for name, v in (("temperature_c", s.temperature_c), ("tensor_active", s.tensor_active),
                                ("memory_used_gib", mem_gib)):
                    if v is not None:
                        self.writer.add_scalar(f"gpu{gi}/{name}", v, step)
        new = health_warnings(samples, step, self.cfg, self.hist)
        for w in new:
            log.warning("rank %d: %s", self.rank, w)
        self.warnings.extend(new)
        return new

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
