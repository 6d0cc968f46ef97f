"""Reading a tuned-configs JSON written on a GPU (bench/tune_triton.py, bench/tune_ternary.py).

A file applies only to GPUs of the architecture it was measured on (_backend.same_architecture: an H100 file serves
an H200, a GH200, an H100 PCIe, whose SMs, registers and shared memory are the H100's; measured on the H100, its
tiles were 1.05-3x faster than the built-in rules) and to the same triton major.minor: tiles that win on one
architecture or triton release do not carry over. Anything else, a missing file included, falls back to the
caller's built-in rule, and the returned text says which and why (`llmkernels info`).
"""

from __future__ import annotations

import json
from typing import Callable

from .._backend import same_architecture


def read_tuned(
    path: str,
    device_name: str,
    capability,
    triton_version: str,
    *,
    expected_format: int,
    fallback: str,
    parse_winners: Callable[[dict], dict],
) -> tuple[dict | None, str]:
    """(parse_winners(file["winners"]) or None, what is used and why). parse_winners raises ValueError (or
    KeyError, TypeError) on an entry it does not accept: the whole file is then ignored, never half of it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, f"{fallback} (no {path})"
    except (OSError, ValueError) as exc:
        return None, f"{fallback} ({path} unreadable: {exc.__class__.__name__})"
    try:
        if data["format"] != expected_format:
            return None, f"{fallback} ({path} has format {data['format']!r}, expected {expected_format})"
        name, cap = data["device"], tuple(data["capability"])
        if name != device_name and not same_architecture(cap, capability):
            return None, f"{fallback} ({path} was measured on {name}, this GPU is {device_name})"
        if data["triton"].split(".")[:2] != triton_version.split(".")[:2]:
            return None, f"{fallback} ({path} was measured with triton {data['triton']}, this is {triton_version})"
        winners = parse_winners(data["winners"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return None, f"{fallback} ({path} is malformed: {exc})"
    return winners, f"measured ({path}: {name}, triton {data['triton']}, {data.get('date', '?')})"
