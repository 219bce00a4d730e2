"""Benchmark ``topk_gating``: Triton kernels vs eager torch vs ``torch.compile`` of the reference.

Forward, and forward + backward (loss = sum(weights * g) + z_loss + load_balancing_loss), over a
grid of N (examples), E (experts) and k (slots). Reports the median time per call with its spread
(20th-80th percentile), the speed-up over eager torch and the achieved memory bandwidth of the
compulsory traffic: forward reads the logits (and bias) and writes weights (fp32), ids and
dispatch order (int64); backward reads the logits (and bias), ids and the weights' gradient and
writes the logits' gradient. On CUDA, ``triton.testing.do_bench`` times each call with a cold L2.

The results go to a marked section of ``--output`` (one section per device kind, the others are
kept) with the machine, versions, date and command, and a plot next to it::

    python benchmarks/bench_gating.py --preset gpu     # on a CUDA machine (H100 targets)
    python benchmarks/bench_gating.py --preset cpu     # torch path only, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from integrations.moe_ranking.gating import topk_gating  # noqa: E402
from integrations.moe_ranking.gating.reference import reference_topk_gating  # noqa: E402

PRESETS = {
    "gpu": {
        "n": [4096, 65536, 1 << 20],
        "e": [8, 16, 64],
        "k": [1, 2, 4],
        "impls": ["triton", "eager", "compile"],
        "compile_at": None,
    },
    "cpu": {
        "n": [4096, 65536],
        "e": [8, 16, 64],
        "k": [1, 2, 4],
        "impls": ["eager", "compile"],
        "compile_at": [(16, 2)],
    },
}
#: Peak HBM bandwidth (GB/s) by device-name fragment, most specific first.
PEAK_GBPS = [("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0), ("A100-SXM4-80GB", 2039.0)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    """One measurement: an implementation on one problem, forward or forward + backward."""

    impl: str
    mode: str
    n: int
    e: int
    k: int
    median_s: float
    p20_s: float
    p80_s: float
    gbps: float


def _bytes_moved(n: int, e: int, k: int, elem: int, mode: str) -> int:
    fwd = n * e * elem + n * k * (4 + 8 + 8)
    bwd = n * e * elem + n * k * (8 + 4) + n * e * elem
    return fwd if mode == "fwd" else fwd + bwd


def _time_cpu(fn: Callable[[], None], warmup: int, repeats: int) -> tuple[float, float, float]:
    """(20th percentile, median, 80th percentile) of ``repeats`` timed calls, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if len(times) < 2:
        return times[0], times[0], times[0]
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return qs[1], statistics.median(times), qs[7]


def _time_cuda(fn: Callable[[], None], warmup: int, repeats: int) -> tuple[float, float, float]:
    """(20th percentile, median, 80th percentile) from ``do_bench`` (warmup/repeats in ms)."""
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=warmup, rep=repeats, quantiles=[0.2, 0.5, 0.8])
    return q[0] * 1e-3, q[1] * 1e-3, q[2] * 1e-3


def _make_fn(impl: str, mode: str, logits: torch.Tensor, k: int) -> Callable[[], None]:
    if impl == "triton":

        def gate(x):
            return topk_gating(x, k, backend="triton")

    elif impl == "eager":

        def gate(x):
            return topk_gating(x, k, backend="torch")

    else:
        compiled = torch.compile(reference_topk_gating, dynamic=False)

        def gate(x):
            return compiled(x, k)

    if impl != "eager":
        with torch.no_grad():
            _check_against_eager(gate, logits, k)
    grad_w = torch.randn(logits.shape[0], k, device=logits.device)
    if mode == "fwd":

        def run() -> None:
            with torch.no_grad():
                gate(logits)

        return run

    leaf = logits.detach().requires_grad_()

    def run_fwd_bwd() -> None:
        out = gate(leaf)
        loss = (out.weights * grad_w).sum() + out.z_loss + out.load_balancing_loss
        loss.backward()
        leaf.grad = None

    return run_fwd_bwd


def _check_against_eager(gate: Callable, logits: torch.Tensor, k: int) -> None:
    """Refuse to time an implementation that disagrees with the eager torch reference."""
    ref = topk_gating(logits, k, backend="torch")
    out = gate(logits)
    same = torch.equal(ref.expert_ids, out.expert_ids)
    if not same or not torch.equal(ref.dispatch_order, out.dispatch_order):
        raise AssertionError("implementation disagrees with eager torch; refusing to time")
    torch.testing.assert_close(out.weights, ref.weights, rtol=1e-5, atol=1e-5)


def run_grid(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Measure every (impl, mode, N, E, k) of the grid."""
    rows = []
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    elem = torch.finfo(DTYPES[args.dtype]).bits // 8
    for n, e, k in itertools.product(args.n, args.e, args.k):
        if k > e:
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(n, e, generator=gen, device=device).to(DTYPES[args.dtype])
        for impl, mode in itertools.product(args.impls, args.modes):
            if impl == "compile" and args.compile_at and (e, k) not in args.compile_at:
                continue
            try:
                fn = _make_fn(impl, mode, logits, k)
                p20, med, p80 = timer(fn, args.warmup, args.repeats)
            except AssertionError:
                raise
            except Exception as exc:  # torch.compile may be unavailable here: record and go on
                print(f"{impl} {mode} N={n} E={e} k={k}: failed: {exc!r}"[:300], flush=True)
                continue
            gbps = _bytes_moved(n, e, k, elem, mode) / med / 1e9
            rows.append(Row(impl, mode, n, e, k, med, p20, p80, gbps))
            print(f"{impl:8s} {mode:7s} N={n:8d} E={e:3d} k={k}: {med * 1e3:9.3f} ms", flush=True)
    return rows


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
            name = next(
                ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln
            )
        except (OSError, StopIteration):
            name = platform.processor() or platform.machine()
        return f"{name} ({platform.machine()})", None
    name = torch.cuda.get_device_name(device)
    return name, next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def render(rows: list[Row], args: argparse.Namespace, device: torch.device) -> str:
    """Markdown section: environment, results table, and the targets where they apply."""
    name, peak = _peak(device)
    peak = args.peak_gbps or peak
    eager = {(r.mode, r.n, r.e, r.k): r.median_s for r in rows if r.impl == "eager"}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"Machine: {name}; {os.cpu_count()} CPU cores visible, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end. "
        f"Python {platform.python_version()}, torch {torch.__version__}"
        f", triton {triton_version}. Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC."
        f" Input dtype {args.dtype}.",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| impl | pass | N | E | k | median | p20-p80 | vs eager | GB/s"
        + (" | % peak |" if peak else " |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:" + ("|---:|" if peak else "|"),
    ]
    for r in sorted(rows, key=lambda r: (r.mode, r.n, r.e, r.k, r.impl)):
        speedup = eager.get((r.mode, r.n, r.e, r.k), float("nan")) / r.median_s
        cells = [
            r.impl,
            r.mode,
            str(r.n),
            str(r.e),
            str(r.k),
            _fmt_time(r.median_s),
            f"{_fmt_time(r.p20_s)} - {_fmt_time(r.p80_s)}",
            f"{speedup:.2f}x",
            f"{r.gbps:.3g}",
        ]
        if peak:
            cells.append(f"{100 * r.gbps / peak:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    if "triton" in args.impls:
        lines += ["", *_targets(rows, eager, peak)]
    return "\n".join(lines)


def _targets(rows: list[Row], eager: dict, peak: float | None) -> list[str]:
    out = ["Targets (H100): >= 3x eager at N=65536, E=16, k=2; >= 60% of peak bandwidth at N=1M."]
    for r in rows:
        if r.impl == "triton" and (r.n, r.e, r.k) == (65536, 16, 2):
            s = eager.get((r.mode, r.n, r.e, r.k), float("nan")) / r.median_s
            out.append(f"- {r.mode}: {s:.2f}x eager: {'met' if s >= 3 else 'NOT met'}")
    for r in rows:
        if r.impl == "triton" and r.n == 1 << 20 and peak:
            frac = r.gbps / peak
            verdict = "met" if frac >= 0.6 else "NOT met"
            out.append(f"- {r.mode} N=1M E={r.e} k={r.k}: {100 * frac:.0f}% of peak: {verdict}")
    return out


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Time per call vs N at E=16, k=2 (left) and vs E at the largest N, k=2 (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r.impl, r.mode) for r in rows})
    n_max = max(r.n for r in rows)
    for impl, mode in series:
        sel = sorted(
            (r.n, r.median_s) for r in rows if (r.impl, r.mode, r.e, r.k) == (impl, mode, 16, 2)
        )
        if sel:
            axes[0].plot(*zip(*sel, strict=True), marker="o", label=f"{impl} {mode}")
        sel = sorted(
            (r.e, r.median_s) for r in rows if (r.impl, r.mode, r.n, r.k) == (impl, mode, n_max, 2)
        )
        if sel:
            axes[1].plot(*zip(*sel, strict=True), marker="o", label=f"{impl} {mode}")
    axes[0].set(
        xscale="log", yscale="log", xlabel="N", ylabel="seconds per call", title="E=16, k=2"
    )
    axes[1].set(
        xscale="log", yscale="log", xlabel="E", ylabel="seconds per call", title=f"N={n_max}, k=2"
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the section between the ``bench_gating:{key}`` markers of ``path``."""
    begin, end = f"<!-- BEGIN bench_gating:{key} -->", f"<!-- END bench_gating:{key} -->"
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Gating benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--n", type=int, nargs="+")
    parser.add_argument("--e", type=int, nargs="+")
    parser.add_argument("--k", type=int, nargs="+")
    parser.add_argument("--impls", nargs="+", choices=["triton", "eager", "compile"])
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--warmup", type=int, default=None, help="calls (CPU) or ms (CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="calls (CPU) or ms (CUDA)")
    parser.add_argument(
        "--compile-all",
        action="store_true",
        help="torch.compile every config (cpu preset: E=16, k=2)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "results" / "gating.md")
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw rows here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    for field in ("n", "e", "k", "impls"):
        if getattr(args, field) is None:
            setattr(args, field, preset[field])
    args.compile_at = None if args.compile_all else preset["compile_at"]
    if device.type != "cuda" and "triton" in args.impls:
        parser.error("the Triton kernels are timed on CUDA only (the interpreter is not a GPU)")
    if args.warmup is None:
        args.warmup = 25 if device.type == "cuda" else 2
    if args.repeats is None:
        args.repeats = 200 if device.type == "cuda" else 7

    rows = run_grid(args, device)
    key = "cuda" if device.type == "cuda" else "cpu"
    png = args.output.with_name(f"{args.output.stem}_{key}.png")
    body = render(rows, args, device) + f"\n\n![{key} timings]({png.name})"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.output, key, body)
    plot(rows, png, f"topk_gating on {_peak(device)[0]} ({args.dtype})")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(f"wrote {args.output} and {png}")


if __name__ == "__main__":
    main()
