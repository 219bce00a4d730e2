"""Where a benchmark ran, for the header of its results page (shared by the benchmark scripts)."""

from __future__ import annotations

import datetime as dt
import os
import platform


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (``?`` where the system does not say)."""
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "?"


def header_lines(cpu_note: str = "") -> list[str]:
    """Markdown bullets: date (UTC), machine with its load average now, CPU model."""
    return [
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, load average at the end {load_average()}",
        f"- CPU: {cpu_model()}{cpu_note}",
    ]
