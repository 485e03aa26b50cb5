"""``foam-hf env``: what FOAM runs on here, in one report to paste into a bug report.

It names the versions of the packages FOAM works with; the fused CPU kernel's state (built or not, the
implementation this CPU runs, the others it could run, or why the build failed); whether Triton imports and, for
every CUDA device, whether FOAM's Triton kernels passed their self-check there
(:func:`foam_hf._fused_triton.triton_ready`, which steps a scratch problem and compares it with the readable
path); and then, for fp32 and bf16 parameters on each device, the implementation ``fused=None`` (FOAM's default,
and ``optim="foam"``'s) steps them with, as :func:`foam_hf.implementation.select_implementation` decides it for
a small weight there. Building the CPU kernel the first time takes a minute; later runs load it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PACKAGES", "Environment", "collect", "describe"]

#: The distributions whose versions the report names (``None`` where one is not installed).
PACKAGES = ("foam-hf", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "triton")

#: How the report names each implementation of :func:`foam_hf.implementation.select_implementation`.
IMPLEMENTATION_NAMES = {
    "fused_cpu": "fused C++ kernel",
    "fused_triton": "fused Triton kernels",
    "foreach": "foreach path (torch._foreach ops)",
    "single_tensor": "for-loop path (the readable one)",
}


@dataclass
class Environment:
    """Everything ``foam-hf env`` reports (``--json`` writes it as is)."""

    python: str
    machine: str
    cpu: str
    cpu_threads: int
    packages: dict[str, str | None]
    cpu_kernel: dict[str, Any]  #: built, isa, isas, openmp, error
    triton_available: bool
    cuda_devices: list[dict[str, Any]] = field(default_factory=list)  #: index, name, triton_ready
    #: "DEVICE, DTYPE parameters" -> the implementation key (see IMPLEMENTATION_NAMES)
    default_paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version(distribution: str) -> str | None:
    """The installed version of ``distribution``; torch's as ``torch.__version__`` gives it, which keeps the build
    tag (``2.14.1+cu130``, ``2.13.0+cpu``) that PyPI's CUDA wheels leave out of their metadata."""
    if distribution == "torch":
        import torch

        return torch.__version__
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> Environment:
    """Look at this machine: versions, the CPU kernel, Triton and each CUDA device, and the default paths."""
    import torch

    from .. import _fused_cpu, _fused_triton
    from ..errors import FoamConfigError
    from ..implementation import select_implementation
    from ..precision import state_dtype_for
    from .demo_training import cpu_name

    isa_error = None
    try:
        kernel = _fused_cpu.load_kernel()
    except FoamConfigError as exc:  # FOAM_CPU_ISA names what this CPU cannot run: report it, as everything else
        kernel, isa_error = None, str(exc)
    name = _fused_cpu.extension_name()
    cpu_kernel: dict[str, Any] = {
        "built": kernel is not None,
        "error": _fused_cpu.kernel_build_error(),
        "cache": _fused_cpu.build_directory(name),
        "isa_env": os.environ.get(_fused_cpu.ISA_ENV, ""),
    }
    if isa_error is not None:
        cpu_kernel["refused"] = isa_error
    if kernel is not None:
        cpu_kernel |= {"isa": kernel.isa(), "isas": list(kernel.available_isas()), "openmp": bool(kernel.openmp())}

    devices = [torch.device("cpu")]
    cuda_devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            device = torch.device("cuda", index)
            devices.append(device)
            ready = _fused_triton.triton_ready(device)  # False without Triton, as when its self-check fails
            cuda_devices.append({"index": index, "name": torch.cuda.get_device_name(index), "triton_ready": ready})
    default_paths = {}
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            weight = torch.zeros(4, 8, dtype=dtype, device=device)
            moment = torch.zeros(4, 2, dtype=state_dtype_for(weight), device=device)
            if device.type == "cpu" and isa_error is not None:
                path = "refused (FOAM_CPU_ISA, see above)"  # a CPU step raises the same error
            else:
                path = select_implementation([weight], [moment], foreach=None, fused=None)
            default_paths[f"{device}, {str(dtype).removeprefix('torch.')} parameters"] = path
    return Environment(
        python=platform.python_version(),
        machine=f"{platform.system()} {platform.machine()}",
        cpu=cpu_name(),
        cpu_threads=torch.get_num_threads(),
        packages={name: _version(name) for name in PACKAGES},
        cpu_kernel=cpu_kernel,
        triton_available=_fused_triton.triton_available(),
        cuda_devices=cuda_devices,
        default_paths=default_paths,
    )


def describe(env: Environment) -> str:
    """The report as Markdown-friendly text, one fact a line."""
    installed = ", ".join(f"{name} {version}" for name, version in env.packages.items() if version is not None)
    missing = [name for name, version in env.packages.items() if version is None]
    lines = [
        f"Python {env.python}, {env.machine}; CPU: {env.cpu}, {env.cpu_threads} threads (torch.get_num_threads())",
        f"Packages: {installed}" + (f"; not installed: {', '.join(missing)}" if missing else ""),
    ]
    kernel = env.cpu_kernel
    if kernel["built"]:
        chosen = f"FOAM_CPU_ISA={kernel['isa_env']} chose it" if kernel.get("isa_env") else "FOAM_CPU_ISA picks another"
        lines.append(
            f"Fused CPU kernel: built; runs {kernel['isa']} (this CPU can run: {', '.join(kernel['isas'])}; "
            f"{chosen}), OpenMP {'on' if kernel['openmp'] else 'off'}; cached in {kernel['cache']}"
        )
    elif kernel.get("refused"):
        lines.append(f"Fused CPU kernel: {kernel['refused']}")
    else:
        from .._fused_cpu import build_failure_summary

        summary = build_failure_summary(kernel["error"] or "")
        lines.append(f"Fused CPU kernel: unavailable ({summary}); CPU parameters take the for-loop path")
    if not env.cuda_devices:
        triton = "Triton importable" if env.triton_available else "Triton not installed"
        lines.append(f"CUDA: no device here ({triton})")
    for device in env.cuda_devices:
        check = "passed" if device["triton_ready"] else "failed or unavailable (see the warning above)"
        lines.append(f"cuda:{device['index']}: {device['name']}; Triton kernels' self-check {check}")
    lines.append('Default path (fused=None, as optim="foam" builds FOAM):')
    for where, path in env.default_paths.items():
        name = IMPLEMENTATION_NAMES.get(path, path)
        if path == "fused_cpu":
            name += f" ({kernel['isa']})"
        lines.append(f"  {where}: {name}")
    return "\n".join(lines)
