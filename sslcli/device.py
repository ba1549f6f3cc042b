"""The one device picker and the one autocast policy of the package (bottom layer: torch + errors).

- `pick_device(kind, local_rank)`: "auto" is the CUDA GPU `local_rank` when one is visible, else
  the CPU; "cuda" without a GPU is a UsageError (exit 2). A CUDA pick becomes the current device.
- `autocast(device, precision)`: bf16 autocast on CUDA GPUs that support bf16 for "auto" and
  "bf16"; on the CPU only for an explicit "bf16"; otherwise no autocast (fp32).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from sslcli.errors import UsageError

DEVICE_KINDS = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


def pick_device(kind: str = "auto", local_rank: int = 0) -> torch.device:
    """kind: auto | cpu | cuda -> torch.device("cuda", local_rank) or torch.device("cpu")."""
    if kind not in DEVICE_KINDS:
        raise UsageError(f"device must be one of {', '.join(DEVICE_KINDS)}, got '{kind}'")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA GPU is visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def autocast(device: torch.device | str, precision: str = "auto") -> ContextManager:
    """Context manager for the forward passes on `device` under `precision` (auto | bf16 | fp32).

    bf16 autocast: CUDA with bf16 support and precision auto/bf16, or the CPU with precision
    bf16. Anything else (fp32, CPU with auto, other device types): a no-op nullcontext.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    kind = torch.device(device).type
    if kind == "cuda" and precision != "fp32" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if kind == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
