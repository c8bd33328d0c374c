"""The Triton contrastive kernels (split-N forward and its merge, both backward passes) compile for a real GPU
(sm_90, H100/H200) with the default blocks, without one.

The interpreter accepts code a GPU rejects (tiles < 16, too much shared memory); compiling ahead of time to
a cubin for sm_90 checks GPU legality here: the dots lower to tensor-core instructions (wgmma / mma) and
each kernel's shared memory fits the 227 KiB per block of an H100/H200.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMEM_LIMIT = 227 * 1024

COMPILE = r'''
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.contrastive_triton as kt

# Membership ids per column (an item's groups): a static loop in the kernels, so the width is a constexpr.
M_GROUPS = 4
out = []
for dtype in (torch.bfloat16, torch.float32):
    rows = torch.empty(1, 512, dtype=dtype)  # only dtype and D matter for the launch arguments
    cfg = kt._blocks
    if dtype == torch.float32:  # the same substitution triton_row_loss makes on a GPU
        cfg = kt.replace(cfg, bwd_m=32, bwd_n=32, num_warps=4)
    a = kt._launch_args(rows, cfg)
    a["PRECISION"] = "tf32x3" if dtype == torch.float32 else "tf32"  # the GPU choice (INTERPRET is off here)
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    i32 = dict(b="i32", n="i32", d="i32", stride_r="i32", stride_c="i32")
    fwd = (kt._fwd_kernel, dict(R=ptr, C=ptr, RG="*i64", CG="*i64", SCALE="*fp32", PART="*fp32", PCNT="*i32",
                                **i32, self_offset="i32", cols_per_split="i32", splits="i32"),
           dict(HAS_SELF=True, M_GROUPS=M_GROUPS, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=a["BLOCK_D"], CAST=False,
                PRECISION=a["PRECISION"]))
    bwd_c = dict(HAS_SELF=True, M_GROUPS=M_GROUPS, BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, BLOCK_D=a["BLOCK_D"], D_PAD=a["D_PAD"],
                 CAST=False, PRECISION=a["PRECISION"])
    rows_k = (kt._bwd_rows_kernel, dict(R=ptr, C=ptr, RG="*i64", CG="*i64", SCALE="*fp32", LSE="*fp32", CNT="*i32",
                                        G="*fp32", DR="*fp32", DS="*fp32", **i32, stride_dr="i32", self_offset="i32",
                                        cols_per_split="i32"),
              bwd_c)
    cols_k = (kt._bwd_cols_kernel, dict(R=ptr, C=ptr, RG="*i64", CG="*i64", SCALE="*fp32", LSE="*fp32", CNT="*i32",
                                        G="*fp32", DC="*fp32", **i32, stride_dc="i32", self_offset="i32"), bwd_c)
    # The merge of the forward's per-split statistics: fp32 [b, splits] buffers whatever the input dtype.
    merge = (kt._fwd_merge_kernel, dict(PART="*fp32", PCNT="*i32", LOSS="*fp32", LSE="*fp32", CNT="*i32", b="i32",
                                        splits="i32"), dict(BLOCK_M=kt.MERGE_BLOCK))
    for name, (fn, sig, const) in zip(("fwd", "fwd_merge", "bwd_rows", "bwd_cols"), (fwd, merge, rows_k, cols_k)):
        sig = {**sig, **{k: "constexpr" for k in const}}
        names = list(sig)
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=4 if name == "fwd_merge" else cfg.num_warps,
                                             num_stages=cfg.num_stages))
        out.append(dict(kernel=name, dtype=str(dtype), shared=kernel.metadata.shared,
                        mma=kernel.asm["ptx"].count("wgmma.mma_async") + kernel.asm["ptx"].count("mma.sync"),
                        cubin=len(kernel.asm["cubin"])))
print(json.dumps(out))
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions, not interpreted
    proc = subprocess.run([sys.executable, "-c", COMPILE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(k["kernel"], k["dtype"]) for k in kernels] == [
        (name, dtype) for dtype in ("torch.bfloat16", "torch.float32") for name in ("fwd", "fwd_merge", "bwd_rows",
                                                                                    "bwd_cols")]
    for k in kernels:
        assert k["cubin"] > 0, k
        assert k["shared"] <= SMEM_LIMIT, k
        if k["kernel"] != "fwd_merge":  # the merge is elementwise over [b, splits]: no dot
            assert k["shared"] > 0, k
            assert k["mma"] > 0, k  # bf16 and 3xTF32 fp32 dots both run on the tensor cores
