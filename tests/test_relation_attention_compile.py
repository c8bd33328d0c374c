"""The relation attention kernels compile for real GPUs (sm_80, sm_90), without a GPU.

The interpreter accepts code that the GPU compiler rejects (types of loop-carried values, loop bounds,
layouts), so the CPU tests alone do not prove the kernels build on a GPU. Triton's wheel ships ptxas:
this compiles every kernel to a cubin for A100 and H100/H200 targets, fp32 and bf16, in a subprocess
(the test session runs Triton in interpreter mode).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.relation_attention_triton as ra

    INDEX = {"ROW_ITEM", "ROW_REL", "ORDER", "ITEM_ORDER", "ITEM_PTR", "PTR"}
    FP32 = {"LSE", "DELTA", "DQ_ROWS", "X"}
    CONST = {"HEAD_DIM": 64, "BLOCK_T": ra.BLOCK_T, "BLOCK_D": 64}

    def arg_type(name, dtype):
        if name in CONST:
            return "constexpr"
        if name in ("T", "H"):
            return "i32"
        if name == "scale":
            return "fp32"
        if name == "VALID":
            return "*u8"
        return "*i64" if name in INDEX else "*fp32" if name in FP32 else "*" + dtype

    kernels = [ra._fwd_kernel, ra._bwd_dq_rows_kernel, ra._bwd_dkv_kernel, ra._segment_sum_kernel]
    for arch in (80, 90):
        for dtype in ("fp32", "bf16"):
            for fn in kernels:
                sig = {n: arg_type(n, dtype) for n in fn.arg_names}
                consts = {(fn.arg_names.index(n),): v for n, v in CONST.items() if n in fn.arg_names}
                src = ASTSource(fn=fn, signature=sig, constexprs=consts)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": ra.NUM_WARPS})
                assert compiled.asm["cubin"], (fn.__name__, arch, dtype)
                print("compiled", fn.__name__, arch, dtype)
""")


@pytest.mark.slow
def test_kernels_compile_for_gpu_targets(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton_cache"),
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 16
