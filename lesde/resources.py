"""Machine resources: memory a job needs against memory available, and devices.

Jobs that allocate large arrays (:func:`lesde.simulate`, a phase-sweep chunk, a training run)
estimate their peak memory from their sizes before allocating anything and refuse, with
:class:`InsufficientMemoryError`, what cannot fit, saying how much is needed, how much is
available, and what to change.

Available memory is ``MemAvailable`` of ``/proc/meminfo`` (or ``psutil.virtual_memory()`` where
that file does not exist), for CUDA devices ``torch.cuda.mem_get_info``. The environment variable
``LESDE_MEMORY_LIMIT`` (bytes, or a number with a K/M/G/T suffix, e.g. ``8G``) caps it, e.g. to
keep a job within a share of a machine.
"""
from __future__ import annotations

import os
import re
from typing import Optional

__all__ = ["InsufficientMemoryError", "available_memory", "check_memory", "format_bytes",
           "check_device"]

_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class InsufficientMemoryError(MemoryError):
    """A job would need more memory than is available; nothing was allocated."""


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _limit_from_env() -> Optional[int]:
    text = os.environ.get("LESDE_MEMORY_LIMIT", "").strip()
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"LESDE_MEMORY_LIMIT must be a number of bytes with an optional K/M/G/T "
                         f"suffix (e.g. 8G), got {text!r}")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])


def _host_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def available_memory(device="cpu") -> Optional[int]:
    """Bytes available for a new allocation on ``device`` (None when unknown), capped by
    ``LESDE_MEMORY_LIMIT``."""
    import torch

    dev = torch.device(device)
    avail = None
    if dev.type == "cuda":
        try:
            avail = int(torch.cuda.mem_get_info(dev)[0])
        except Exception:
            avail = None
    else:
        avail = _host_available()
    limit = _limit_from_env()
    if limit is not None:
        avail = limit if avail is None else min(avail, limit)
    return avail


def check_memory(need: float, what: str, advice: str, device="cpu") -> None:
    """Raise :class:`InsufficientMemoryError` when ``need`` bytes exceed what is available.

    The message reads ``"<what> needs about X, but only Y is available[ on device]; <advice>"``.
    """
    avail = available_memory(device)
    if avail is None or need <= avail:
        return
    where = "" if str(device) == "cpu" else f" on {device}"
    raise InsufficientMemoryError(
        f"{what} needs about {format_bytes(need)} of memory, but only {format_bytes(avail)} is "
        f"available{where}; {advice}")


def check_device(device, name: str = "device"):
    """The ``torch.device`` named by ``device``, refused with ``ValueError`` (naming ``name``)
    when the string is not a device or the device is not available on this machine."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{name} {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {str(device)!r}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {str(device)!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{name} {str(device)!r}: MPS is not available on this machine; use 'cpu'")
    elif dev.type != "cpu":
        raise ValueError(f"{name} {str(device)!r}: lesde runs on 'cpu' or 'cuda' devices")
    return dev
