"""Models that are not stableflows checkpoints, for ``stableflows audit --model-spec``.

``MODULE:CALLABLE`` (a dotted module importable from the current directory, e.g.
``my_package.flows:build_flow``) or ``PATH.py:CALLABLE`` names a function taking no arguments that
returns

* a flow of any kind :func:`~stableflows.audit.adapters.as_invertible` accepts (stableflows,
  normflows, zuko, FrEIA, nflows, a module following the layer protocol), or
* a pair ``(forward, inverse)`` (or ``(forward, inverse, module)``) of callables on tensors.

``--weights FILE`` is a ``state_dict`` saved with ``torch.save`` (loaded with
``weights_only=True``; a dict holding it under ``"state_dict"`` or ``"model"`` works too), loaded
strictly into the flow, or into the module owning the pair (the ``__self__`` of bound methods, or
the third entry).

``--data`` is a dataset name of :func:`stableflows.data.load_dataset` (integer levels, dequantised
by the audit) or a tensor file (``.pt`` saved with ``torch.save``, or ``.npy``) of examples
``(B, *shape)``: model-space values, or integer levels when ``--levels`` is given.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError

__all__ = ["load_spec", "load_weights", "load_tensor_data", "spec_label"]


def _callable(spec: str):
    if ":" not in spec:
        raise ConfigError(f"--model-spec {spec!r}: expected MODULE:CALLABLE or PATH.py:CALLABLE")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"--model-spec: no such file {where}")
        mod_name = f"_stableflows_spec_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"--model-spec: importing {where} raised {type(e).__name__}: {e}") from e
        finally:
            sys.path.pop(0)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as 'python -m' does: the user's own packages
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise ConfigError(f"--model-spec: cannot import {where!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"--model-spec: {where} has no callable {name!r}")
    return fn


def load_spec(spec: str):
    """``(model, module)``: what the spec's callable returns, and the ``nn.Module`` its weights go into."""
    fn = _callable(spec)
    try:
        out = fn()
    except Exception as e:
        raise ConfigError(f"--model-spec: {spec}() raised {type(e).__name__}: {e}") from e
    if isinstance(out, (tuple, list)) and len(out) in (2, 3) and all(callable(f) for f in out[:2]):
        module = out[2] if len(out) == 3 else getattr(out[0], "__self__", None)
        if len(out) == 3 and not isinstance(module, nn.Module):
            raise ConfigError(f"--model-spec: the third entry of what {spec}() returns must be an nn.Module")
        pair = (out[0], out[1])
        return pair, module if isinstance(module, nn.Module) else None
    if isinstance(out, nn.Module):
        return out, out
    raise ConfigError(f"--model-spec: {spec}() returned a {type(out).__name__}; expected a flow (nn.Module) or a "
                      "pair (forward, inverse)")


def load_weights(module: nn.Module | None, path: str, map_location="cpu") -> None:
    if module is None:
        raise ConfigError("--weights needs a module to load into: return a flow, bound methods of an nn.Module, or "
                          "(forward, inverse, module) from the --model-spec callable")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--weights: no such file {path}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ConfigError(f"--weights {path}: not a state_dict saved with torch.save ({type(e).__name__}: {e})") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ConfigError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"--weights {path} do not fit the model: {str(e).splitlines()[0]}") from e


def load_tensor_data(path: str) -> torch.Tensor:
    p = Path(path)
    try:
        if p.suffix == ".npy":
            import numpy as np

            x = torch.from_numpy(np.load(p, allow_pickle=False))
        else:
            x = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(x, dict):
                x = x.get("x", x.get("data"))
    except Exception as e:
        raise ConfigError(f"--data {path}: cannot read a tensor ({type(e).__name__}: {e})") from e
    if not torch.is_tensor(x):
        raise ConfigError(f"--data {path}: expected a tensor (B, *shape), or a dict with one under 'x'")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ConfigError(f"--data {path}: expected examples (B, *shape) with B >= 1, got shape {tuple(x.shape)}")
    return x if x.is_floating_point() else x.float()


def spec_label(spec: str) -> str:
    """A file-name-safe name of what a spec audits (``module.fn`` -> ``module.fn``)."""
    where, _, name = spec.rpartition(":")
    base = Path(where).stem if where.endswith(".py") else where
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{base}.{name}")
