"""Compile the Triton kernels ahead of time for a CUDA target, without a GPU.

Lowers each kernel through Triton's compiler down to a cubin (ptxas ships with triton) and
prints its shared-memory use. Run with TRITON_INTERPRET unset; used by
tests/test_triton_backend.py in a subprocess:

    PYTHONPATH=src python tests/triton_aot.py --dtype bfloat16 --arch 90 --head-dim 64 --window 8
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from winattn.ops.backends import triton_kernels as K

POINTERS = {"Q", "K", "V", "Bias", "Out", "Lse", "DOut", "Delta", "DQ", "DK", "DV", "DBias"}
FLOAT32_POINTERS = {"Lse", "Delta", "DBias"}
KERNELS = {
    "forward": (K._forward_kernel, {}),
    "dq": (K._backward_dq_kernel, {}),
    "dkdv": (K._backward_dkdv_kernel, {"BIAS_GRAD": True}),
}
TRITON_TYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def signature(kernel, element: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + ("fp32" if name in FLOAT32_POINTERS else element)
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(TRITON_TYPE), default="float16")
    parser.add_argument("--arch", type=int, default=80, help="compute capability, e.g. 80, 90")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--window", type=int, default=7, help="square 2-D window")
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=sorted(KERNELS))
    args = parser.parse_args()
    if K.INTERPRETED:
        raise SystemExit("TRITON_INTERPRET is set: unset it to compile the kernels")

    dtype = getattr(torch, args.dtype)
    config = K.launch_config(args.window**2, args.head_dim, dtype)
    options = {key: config.pop(key) for key in ("num_warps", "num_stages")}
    dot_dtype, precision = K._dot_types(dtype)
    shift = args.window // 2
    constexprs = dict(
        HEAD_DIM=args.head_dim,
        N=math.prod((args.window, args.window)),
        W0=1, W1=args.window, W2=args.window,
        S0=0, S1=shift, S2=shift,
        HAS_BIAS=True,
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION=precision,
        **config,
    )  # fmt: skip
    target = GPUTarget("cuda", args.arch, 32)
    for name in args.kernels:
        kernel, extra = KERNELS[name]
        consts = dict(constexprs, **extra)
        source = ASTSource(kernel, signature(kernel, TRITON_TYPE[args.dtype], consts), consts)
        compiled = triton.compile(source, target=target, options=options)
        print(
            f"{name}: sm_{args.arch} {args.dtype} head_dim {args.head_dim} window {args.window}: "
            f"cubin {len(compiled.asm['cubin'])} bytes, shared memory {compiled.metadata.shared} B"
        )


if __name__ == "__main__":
    main()
