"""Compile the gating kernels for an H100 (sm_90) without a GPU: ``python gating_compile.py``.

The Triton interpreter is more lenient than the compiler; this catches kernels that interpret but do
not compile. It needs triton in compiled mode (no ``TRITON_INTERPRET``), hence a separate process.
Prints the registers and stack of each compiled kernel (``cuobjdump --dump-resource-usage``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from integrations.moe_ranking.gating.triton_kernels import build_kernels

TARGET = GPUTarget("cuda", 90, 32)
_I32 = "i32"
_FWD = [
    "logits_ptr",
    "bias_ptr",
    "weights_ptr",
    "ids_ptr",
    "part_counts_ptr",
    "part_probs_ptr",
    "part_z_ptr",
]
_DISPATCH = [
    "ids_ptr",
    "part_counts_ptr",
    "part_probs_ptr",
    "part_z_ptr",
    "counts_ptr",
    "offsets_ptr",
    "mean_probs_ptr",
    "z_ptr",
    "lb_ptr",
    "order_ptr",
]
_BWD = [
    "logits_ptr",
    "bias_ptr",
    "ids_ptr",
    "grad_w_ptr",
    "grad_mean_ptr",
    "grad_z_ptr",
    "grad_lb_ptr",
    "counts_ptr",
    "grad_x_ptr",
]


def _signature(ptr_names, ptr_types, int_names, constexprs):
    sig = {name: f"*{ptr_types.get(name, 'fp32')}" for name in ptr_names}
    sig.update({name: _I32 for name in int_names})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def _resource_usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return " ".join(line.split()[:3])


def compile_all(e: int, k: int, dtype: str, has_bias: bool, renormalize: bool) -> list[str]:
    """Compile the three kernels for one configuration; return their resource usage lines."""
    kern = build_kernels(interpret=False)
    block_e = max(2, triton.next_power_of_2(e))
    block_n = max(4, min(1024, 1024 // block_e))
    block_k = max(2, triton.next_power_of_2(k))
    fwd_c = {
        "K": k,
        "HAS_BIAS": has_bias,
        "RENORMALIZE": renormalize,
        "BLOCK_N": block_n,
        "BLOCK_E": block_e,
        "BLOCK_K": block_k,
    }
    disp_c = {"K": k, "BLOCK_N": block_n, "BLOCK_E": block_e, "BLOCK_P": 128}
    bwd_c = {
        "K": k,
        "HAS_BIAS": has_bias,
        "RENORMALIZE": renormalize,
        "BLOCK_N": block_n,
        "BLOCK_E": block_e,
    }
    ints = {
        "ids_ptr": "i64",
        "part_counts_ptr": "i32",
        "counts_ptr": "i64",
        "offsets_ptr": "i64",
        "order_ptr": "i64",
    }
    jobs = [
        (
            kern.fwd,
            _signature(
                _FWD,
                {**ints, "logits_ptr": dtype, "bias_ptr": dtype},
                ["n_rows", "n_experts", "rows_per_prog", "stride_logits", "stride_bias"],
                fwd_c,
            ),
            fwd_c,
        ),
        (
            kern.dispatch,
            _signature(
                _DISPATCH, ints, ["n_rows", "n_experts", "n_parts", "rows_per_prog"], disp_c
            ),
            disp_c,
        ),
        (
            kern.bwd,
            _signature(
                _BWD,
                {**ints, "logits_ptr": dtype, "bias_ptr": dtype, "grad_x_ptr": dtype},
                [
                    "n_rows",
                    "n_experts",
                    "stride_logits",
                    "stride_bias",
                    "stride_gw_row",
                    "stride_gw_slot",
                ],
                bwd_c,
            ),
            bwd_c,
        ),
    ]
    usage = []
    for fn, sig, constexprs in jobs:
        compiled = triton.compile(
            ASTSource(fn, sig, constexprs=constexprs), target=TARGET, options={"num_warps": 4}
        )
        usage.append(f"{fn.__name__}: {_resource_usage(compiled.asm['cubin'])}")
    return usage


#: One configuration touching every code path: non-power-of-two E and k, bf16, bias, renormalise.
CONFIGS = [(13, 3, "bf16", True, True)]

if __name__ == "__main__":
    configs = CONFIGS
    if len(sys.argv) > 1 and sys.argv[1] == "--grid":
        configs = [(e, k, "fp32", False, True) for e in (8, 16, 64) for k in (1, 2, 4)]
    for config in configs:
        print(config, "; ".join(compile_all(*config)), flush=True)
