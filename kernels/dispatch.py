"""Which face of an op runs: one rule for every op in kernels/.

Each op has three faces behind one signature, picked by ``impl``: ``reference`` (the naive oracle),
``torch`` (the CPU path) and ``triton`` (the GPU kernels; on CPU only under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "torch", "triton", "reference")


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA tensors, ``torch`` elsewhere; validates the name."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"impl='triton' on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before kernels are imported, move the tensors to a GPU, or use impl='torch'"
        )
    return impl
