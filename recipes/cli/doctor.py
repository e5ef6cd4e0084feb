"""``effnetv2 doctor``: what this machine has, and which pipeline backends it can run.

Every line is measured on the spot (an import, a device query), never assumed.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import subprocess


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return str(getattr(mod, "__version__", "unknown version"))


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return out.splitlines()[0] if out else None


def collect() -> dict[str, object]:
    """Facts about this machine, as a dict (also used by benchmarks to label their results)."""
    import torch

    cuda = torch.cuda.is_available()
    facts: dict[str, object] = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": _cpu_model(),
        "cpu_count": _cpu_count(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "driver": _driver_version(),
        "dali": _version("nvidia.dali"),
        "webdataset": _version("webdataset"),
        "albumentations": _version("albumentations"),
        "opencv": _version("cv2"),
        "timm": _version("timm"),
        "torchvision": _version("torchvision"),
    }
    return facts


def usable_backends(facts: dict[str, object]) -> dict[str, str | None]:
    """Backend name -> None when usable, else the reason it is not."""
    dali, gpu = facts["dali"], facts["cuda_available"]
    cv_ok = bool(facts["opencv"])
    return {
        "dali-gpu": None if dali and gpu else ("DALI is not installed" if not dali else "no CUDA GPU visible"),
        "dali-cpu": None if dali else "DALI is not installed (pip install nvidia-dali-cuda120, Linux only)",
        "opencv": None if cv_ok else "needs opencv-python-headless (pip install opencv-python-headless)",
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    facts = collect()
    missing = "MISSING"
    rows = [
        ("Python", facts["python"]),
        ("platform", facts["platform"]),
        ("CPU", f"{facts['cpu']} ({facts['cpu_count']} cores usable)"),
        ("torch", f"{facts['torch']} (CUDA build: {facts['torch_cuda_build'] or 'none, CPU only'})"),
        ("GPU", facts["gpu"] or "none visible (torch.cuda.is_available() is False)"),
        ("NVIDIA driver", facts["driver"] or "none (nvidia-smi not found or failed)"),
        ("DALI", facts["dali"] or f"{missing}: pip install nvidia-dali-cuda120 (Linux x86_64/aarch64 only)"),
        ("OpenCV", facts["opencv"] or f"{missing}: pip install opencv-python-headless"),
        ("webdataset (optional)", facts["webdataset"] or "not installed (only tests read shards with it)"),
        ("albumentations (optional)", facts["albumentations"] or "not installed (only the loader benchmark's peer)"),
        ("timm (optional)", facts["timm"] or "not installed (only benchmarks compare against it)"),
        ("torchvision (optional)", facts["torchvision"] or "not importable (only benchmarks compare against it)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("\npipeline backends:")
    for backend, reason in usable_backends(facts).items():
        print(f"  {backend:<15} {'usable' if reason is None else 'not usable: ' + reason}")
    return 0
