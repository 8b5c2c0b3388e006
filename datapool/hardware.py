"""What this machine computes natively, for choices that depend on it (bf16 training,
the selection engine's bfloat16 pool pass)."""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["cpu_has_native_bf16"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 ``avx512_bf16`` or ``amx_bf16``).

    Read once from ``/proc/cpuinfo``'s flags (False where there is none, e.g. macOS).
    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: that is also true on plain
    AVX-512 CPUs, where oneDNN emulates bf16 more slowly than fp32 (as emulated float16
    products show on this project's AMD EPYC: 0.6 GFLOP/s against float32's 53).
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return "avx512_bf16" in flags or "amx_bf16" in flags
