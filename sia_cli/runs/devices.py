"""Device selection shared by every command."""

import torch

from sia_cli.errors import SiaError


def pick_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SiaError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    try:
        torch.device(name)
    except RuntimeError:
        raise SiaError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N, auto)") from None
    return name
