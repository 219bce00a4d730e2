"""Peak memory of a piece of code, shared by the benchmark scripts.

On CUDA: the caching allocator's peak counter. On CPU there is no such counter, so the CPU
allocator's own events are recorded with ``torch.profiler.profile(profile_memory=True)`` (every
allocation and free, with its size, in order) and the peak of their running sum is taken.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C-level start/stop lines (fd 2) while it runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(run: Callable[[], None], device: torch.device | None = None) -> int:
    """Peak of live allocator bytes while ``run`` executes, relative to its start."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        with quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                run()
            prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    # Each CPU allocation / free is a "[memory]" event with a signed "Bytes"; order by index.
    mem = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    mem.sort(key=lambda e: (e["args"].get("Ev Idx", 0), e["ts"]))
    live = peak = 0
    for e in mem:
        live += int(e["args"]["Bytes"])
        peak = max(peak, live)
    return peak
