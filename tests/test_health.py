"""Health monitoring, the spike/NaN guard and the hang watchdog."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from krea2.errors import Krea2Error
from krea2.models.dit import PRESETS
from krea2.train.guard import GuardConfig, SpikeGuard
from krea2.train.health import (
    GIB,
    GpuSample,
    HealthConfig,
    HealthMonitor,
    NvmlReader,
    _History,
    dit_train_flops,
    health_warnings,
)
from krea2.train.watchdog import Watchdog


class FakeReader:
    """Stands in for NVML: the rules and the exporter are tested without a GPU."""

    available, reason, handles = True, "", [(0, None)]

    def __init__(self, samples):
        self.samples = samples

    def read(self):
        return self.samples


def test_no_gpu_is_said_plainly():
    reader = NvmlReader()
    if reader.available:
        pytest.skip("this machine has a GPU")
    assert reader.read() == [] and reader.reason
    mon = HealthMonitor(HealthConfig(gpu_every=1), reader=reader)
    assert "no NVIDIA GPU" in mon.status and reader.reason in mon.status
    assert mon.log_step(1, loss=0.5) == []


def test_release_thresholds_warn():
    cfg = HealthConfig(stuck_after_steps=20)
    hist = _History()
    s = GpuSample(0, temperature_c=70, memory_used_bytes=5 * GIB, pcie_replay=3)
    assert health_warnings([s], 0, cfg, hist) == []
    hot = GpuSample(0, temperature_c=77, memory_used_bytes=5 * GIB, pcie_replay=40, xid_errors=[79],
                    throttle_reasons=0x40 | 0x1)
    w = " | ".join(health_warnings([hot], 10, cfg, hist))
    assert "77 C" in w and "XID 79" in w and "PCIe replay burst (+37)" in w and "hw thermal" in w and "idle" not in w
    w = health_warnings([GpuSample(0, memory_used_bytes=int(5.1 * GIB))], 20, cfg, hist)
    assert w == ["GPU 0 memory stuck at 5.1 GiB since start: reboot the node"]
    # a GPU that grew into its working set is fine
    hist2 = _History()
    health_warnings([GpuSample(1, memory_used_bytes=1 * GIB)], 0, cfg, hist2)
    assert health_warnings([GpuSample(1, memory_used_bytes=60 * GIB)], 20, cfg, hist2) == []


def test_prometheus_endpoint_serves_training_and_gpu_metrics(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    sample = GpuSample(0, temperature_c=80.0, memory_used_bytes=40 * GIB, tensor_active=0.55, xid_errors=[48])
    mon = HealthMonitor(HealthConfig(port=0, gpu_every=2), writer=writer, reader=FakeReader([sample]))
    try:
        mon.log_step(1, loss=0.25, grad_norm=1.5, step_time_s=0.2, tokens_per_s=1234.0, mfu=0.41)
        warns = mon.log_step(2, loss=0.3)
        assert any("80 C" in w for w in warns) and any("XID 48" in w for w in warns)
        mon.record_bad_step(2, "loss is nan")
        body = urllib.request.urlopen(f"http://127.0.0.1:{mon.port}/metrics", timeout=5).read().decode()
    finally:
        mon.close()
        writer.close()
    for line in ("krea2_loss 0.3", "krea2_grad_norm 1.5", "krea2_tokens_per_second 1234.0", "krea2_mfu 0.41",
                 "krea2_step 2.0", 'krea2_gpu_temperature_celsius{gpu="0"} 80.0',
                 'krea2_gpu_tensor_active_ratio{gpu="0"} 0.55', 'krea2_gpu_xid_errors_total{gpu="0"} 1.0',
                 "krea2_bad_steps_total 1.0"):
        assert line in body, line
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_flops_of_the_12b_config():
    # 1024 px: 64x64 = 4096 image tokens + 512 text; block linears dominate: 2 * 434M params per token per block
    f = dit_train_flops(PRESETS["krea2-12b"], 4096, 512)
    linears = 3 * 2 * 4608 * 28 * 434_122_752
    assert linears < f < 1.5 * linears


# ---------------------------------------------------------------- guard


def test_guard_flags_nan_inf_and_spikes():
    g = SpikeGuard(GuardConfig(window=10, min_steps=5, spike_factor=3.0))
    for i in range(6):
        assert g.check(torch.tensor(1.0 + 0.01 * i), grad_norm=1.0)
    v = g.check(torch.tensor(float("nan")))
    assert not v and v.action == "skip" and "nan" in v.reason
    assert not g.check(1.0, grad_norm=float("inf"))
    assert not g.check(5.0) and g.check(2.5)  # 5 > 3x median spikes, 2.5 does not
    assert g.total_bad == 3


def test_guard_escalates_and_rolls_back():
    g = SpikeGuard(GuardConfig(action="skip", max_consecutive=3))
    assert [g.check(float("nan")).action for _ in range(3)] == ["skip", "skip", "rollback"]
    assert SpikeGuard(GuardConfig(action="rollback")).check(float("inf")).action == "rollback"
    with pytest.raises(Krea2Error):
        GuardConfig(action="ignore")


def test_guard_skip_keeps_weights_and_rollback_restores(tmp_path):
    """The guard in a loop: a poisoned batch never reaches the weights; rollback reloads the last checkpoint."""
    from krea2.train.checkpoint import load_training_state, save_training_state

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for action in ("skip", "rollback"):
        guard = SpikeGuard(GuardConfig(action=action))
        save_training_state(tmp_path / action, model, opt, {"step": 0})
        good = model.weight.detach().clone()
        loss = ((model(x) - y * float("nan")) ** 2).mean()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        verdict = guard.check(loss, gn)
        if verdict:
            opt.step()
        elif verdict.action == "rollback":
            opt.step()  # pretend the bad update landed before the rollback
            assert torch.isnan(model.weight).all()
            load_training_state(tmp_path / action, model, opt)
        opt.zero_grad()
        assert torch.equal(model.weight, good), action


# ---------------------------------------------------------------- watchdog


def test_watchdog_fires_without_kicks_and_not_with_them(tmp_path):
    fired = threading.Event()
    with Watchdog(0.3, dump_path=tmp_path / "stacks.txt", poll_s=0.05, on_hang=lambda s: fired.set()) as wd:
        for _ in range(10):
            time.sleep(0.05)
            wd.kick("step")
        assert not fired.is_set()
        assert fired.wait(3.0)
    dump = (tmp_path / "stacks.txt").read_text()
    assert "made no progress" in dump and "last: step" in dump and "test_watchdog_fires" in dump


def test_watchdog_exits_non_zero_on_a_stall():
    """The main thread blocks forever (as in a collective waiting on a dead peer): dump stacks, exit 124."""
    code = ("import threading; from krea2.train.watchdog import Watchdog\n"
            "Watchdog(0.5, poll_s=0.1).start()\n"
            "threading.Event().wait()  # stands in for an all-reduce that never returns\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 124, p.stderr[-2000:]
    assert time.monotonic() - t0 < 20
    assert "made no progress" in p.stderr and "(most recent call first)" in p.stderr
