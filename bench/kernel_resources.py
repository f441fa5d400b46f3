"""Registers, spills and shared memory of rfclip.kernels' Triton kernels, compiled for a GPU without one.

    python bench/kernel_resources.py [--arch 90] [--tokens 197,257,577] [--dtype bf16] [--json out.json]

Each kernel is compiled ahead of time exactly as a launch would compile it: the same block sizes and warps
(``rfclip.kernels.*_launch``), and the specialisation Triton's JIT applies to the arguments of a real
call (integer arguments equal to 1 become constants, pointers and integers divisible by 16 are marked so).
The arguments are those of a ViT-B/16-shaped call (12 heads of 64) with ``--tokens`` tokens. ``ptxas -v``
(bundled with Triton) reports registers and spills. A kernel whose shared memory exceeds the target's
limit would fail at launch. That is what the table checks; timings need a GPU (bench/bench_methods.py).
Run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch

from rfclip import kernels
from rfclip.segmenter import DTYPES

# Largest dynamic shared memory one block may use, bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8"}


def example_launches(t: int, dtype: torch.dtype, heads: int = 12, dh: int = 64, crops: int = 2) -> dict:
    """The kernels' launches for ``crops`` crops of ``t`` tokens, with the strides of real calls: q, k, v as
    views of one ``(B, T, 3, H, dh)`` projection (rfclip.vit.DenseViT.qkv), kept keys contiguous; the cut's
    on ``(B, N, N)`` contiguous matrices."""
    qkv = torch.empty(crops, t, 3, heads, dh, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    n = t - 1
    masks = torch.zeros(crops, n, dtype=torch.uint8)
    rows = torch.empty(crops, n)
    cut, _ = kernels.squaring_launches(torch.empty(crops, n, n), rows, rows, torch.empty(n), 2, 128.0)
    return {
        "kk_head_mean": kernels.kk_head_mean_launch(k.contiguous(), torch.zeros(crops, n, n), dh ** -0.5),
        "redistributed": kernels.redistributed_launch(q, k, v, masks, masks, torch.empty(v.shape, dtype=dtype),
                                                      0.7, dh ** -0.5),
        # the squaring cut (float16 products whatever the model's dtype): operator, a squaring, the last one
        "cut_operator": cut[0], "cut_square": cut[1], "cut_square_last": cut[2],
    }


def compile_for(launch: kernels.Launch, arch: int) -> dict:
    """Compile ``launch`` for ``sm_<arch>`` and return its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = triton.jit(launch.body)
    signature, constants, attrs = {}, dict(launch.constexprs), {}
    divisible = [["tt.divisibility", 16]]
    for i, (name, value) in enumerate(zip(fn.arg_names, launch.args)):
        index = (i,)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[index] = divisible                    # torch allocations and these views are 16-byte aligned
        elif isinstance(value, int) and value == 1:
            constants[name] = 1
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[index] = divisible
        else:
            signature[name] = "fp32"
    signature.update({name: "constexpr" for name in constants})
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    options = make_backend(target).parse_options(options).__dict__
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs), target=target,
                              options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", f.name,
                                 "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {"registers": registers, "spill_store_bytes": int(spills.group(1)) if spills else 0,
            "shared_bytes": int(compiled.metadata.shared),
            "fits": int(compiled.metadata.shared) <= SHARED_LIMIT.get(arch, 48 * 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 (A100), 86, 89, 90 (H100)")
    p.add_argument("--tokens", default="197,257,577", help="T values: ViT-B/16 at 224, ViT-L/14 at 224 and 336")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if kernels.interpreted():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    dtype = DTYPES[args.dtype]
    rows = []
    print(f"# rfclip.kernels compiled for sm_{args.arch}, {args.dtype}, 12 heads of 64")
    print("| kernel | T | tile | warps | registers | spill stores (bytes) | shared (KiB) | fits |")
    print("|---|---|---|---|---|---|---|---|")
    for t in (int(x) for x in args.tokens.split(",")):
        for name, launch in example_launches(t, dtype).items():
            r = compile_for(launch, args.arch)
            c = launch.constexprs
            rows.append({"kernel": name, "tokens": t, **r})
            tile = (f"{c['BLOCK_M']} x {c['BLOCK_T']}" if "BLOCK_M" in c
                    else f"{c['BLOCK']} x {c['BLOCK']}" + (f" (k {c['BLOCK_K']})" if "BLOCK_K" in c else ""))
            print(f"| {name} | {t} | {tile} | {launch.num_warps} | {r['registers']} | "
                  f"{r['spill_store_bytes']} | {r['shared_bytes'] / 1024:.0f} | {'yes' if r['fits'] else 'NO'} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "dtype": args.dtype, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
