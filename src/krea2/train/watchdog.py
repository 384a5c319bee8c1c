"""Hang watchdog: a silent collective stall (the release's most common large-run failure) becomes a fast crash.

The trainer kicks the watchdog once per step. If no kick arrives within `timeout_s`, a daemon thread dumps every
thread's stack with faulthandler (to stderr and, if given, a per-rank file) and exits the process non-zero, so the
launcher (torchrun --max-restarts, Kubernetes) restarts from the last checkpoint instead of waiting on NCCL forever.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

HANG_EXIT_CODE = 124  # what `timeout` uses; launchers treat any non-zero as a failure worth restarting


class Watchdog:
    def __init__(self, timeout_s: float, dump_path: str | os.PathLike | None = None, exit_code: int = HANG_EXIT_CODE,
                 poll_s: float | None = None, on_hang=None):
        self.timeout_s = float(timeout_s)
        self.dump_path = dump_path
        self.exit_code = exit_code
        self.poll_s = poll_s if poll_s is not None else min(5.0, self.timeout_s / 4)
        self.on_hang = on_hang  # tests replace the exit; production leaves it None
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.label = ""

    def kick(self, label: str = "") -> None:
        """Progress was made (a step finished); `label` names it in the hang report."""
        self._last = time.monotonic()
        self.label = label

    def start(self) -> Watchdog:
        self.kick("start")
        self._thread = threading.Thread(target=self._run, name="krea2-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 1)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            stalled = time.monotonic() - self._last
            if stalled > self.timeout_s:
                self._hang(stalled)
                return

    def _hang(self, stalled: float) -> None:
        rank = os.environ.get("RANK", "0")
        msg = (f"krea2 watchdog: rank {rank} made no progress for {stalled:.0f} s (timeout {self.timeout_s:.0f} s; "
               f"last: {self.label or 'nothing'}); dumping stacks and exiting {self.exit_code}\n")
        sys.stderr.write(msg)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.dump_path is not None:
            with open(self.dump_path, "w") as f:
                f.write(msg)
                faulthandler.dump_traceback(file=f, all_threads=True)
        sys.stderr.flush()
        if self.on_hang is not None:
            self.on_hang(stalled)
            return
        os._exit(self.exit_code)  # not sys.exit: the main thread is stuck in a collective and would never unwind
