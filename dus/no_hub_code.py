"""No compiled code from the Hub unless the user asks for it.

transformers (5.25) installs the `kernels` package, and bitsandbytes, imported by peft on every
heal, calls `kernels.get_kernel("kernels-community/...")` on CPUs with AVX512-BF16: that downloads
a compiled library from the Hugging Face Hub and loads it into the process. dus never runs code
it was not asked to run, so `get_kernel` (wherever `kernels` is imported from) refuses unless
DUS_ALLOW_HUB_KERNELS=1; bitsandbytes then uses its own CPU kernels, as it does without `kernels`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

ALLOW = "DUS_ALLOW_HUB_KERNELS"


def _refuse(repo_id, *args, **kwargs):
    raise RuntimeError(f"dus does not load compiled code from the Hub ({repo_id}); set {ALLOW}=1 to allow it")


def _guard(module) -> None:
    if os.environ.get(ALLOW) != "1" and hasattr(module, "get_kernel"):
        module.get_kernel = _refuse


class _GuardedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _guard(module)


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the `kernels` package so that its get_kernel refuses once loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _GuardedLoader(spec.loader)
        return spec


def refuse_hub_kernels() -> None:
    """Install the guard (once), before any library that imports `kernels` loads."""
    if "kernels" in sys.modules:
        _guard(sys.modules["kernels"])
    elif not any(isinstance(finder, _KernelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _KernelsFinder())
