"""The layer contract, checked for every entry of ``registry.ENTRIES`` in float64.

For each entry: build, ``.double()``, one forward in train mode (data-dependent initialisation),
switch to eval; then, both as initialised and after perturbing every parameter (so zero-initialised
conditioners become non-trivial):

* round trip ``x -> z -> x`` within ``roundtrip_atol``; each example alone gives what it gives in a batch;
* log-dets of shape ``(B,)``, inverse log-det ``== -`` forward log-det;
* forward and inverse log-det ``== log|det J|`` of the autograd Jacobian (per example, flattened),
  and ``J_inverse(z) @ J_forward(x) == I``;
* ``torch.autograd.gradcheck`` w.r.t. the input (entries with ``gradcheck=True``).

Conditional entries (``context_shape`` set) get a context ~ N(0, 1) per example, passed to every
call; every check holds at that fixed context (the Jacobians are those in ``x`` alone).

Finally every Transform subclass defined in ``stableflows.transforms`` must have an entry.
"""
import importlib
import pkgutil
import zlib

import pytest
import torch
from torch.autograd.functional import jacobian

from registry import ABSTRACT_BASES, ENTRIES
import stableflows.transforms
from stableflows.transforms.base import Transform

BATCH = 3  # examples per round-trip / Jacobian check
INIT_BATCH = 16  # examples of the data-dependent initialisation
GRAD_BATCH = 2  # examples of gradcheck
PERTURB_STD = 0.1  # std of the random perturbation added to every parameter
JACOBIAN_PRODUCT_ATOL = 1e-7  # |J_inv J_fwd - I|
BATCH_TOL = 1e-10  # one example alone vs. inside a batch (rtol and atol)


def _inputs(entry, n: int, gen: torch.Generator) -> torch.Tensor:
    if entry.domain == "unit":
        return 0.05 + 0.9 * torch.rand(n, *entry.shape, generator=gen, dtype=torch.float64)
    return torch.randn(n, *entry.shape, generator=gen, dtype=torch.float64)


def _contexts(entry, n: int, gen: torch.Generator):
    if entry.context_shape is None:
        return None
    return torch.randn(n, *entry.context_shape, generator=gen, dtype=torch.float64)


def _at(fn, context):
    """``fn`` with the context fixed (``fn`` itself for an unconditional entry)."""
    if context is None:
        return fn
    return lambda v: fn(v, context)


def _prepared(name: str, perturbed: bool):
    """The module of entry ``name`` in float64, initialised on a batch, in eval mode; and a generator."""
    entry = ENTRIES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    torch.manual_seed(zlib.crc32(name.encode()))  # random inits inside build() (1x1 conv, nets)
    module = entry.build().double()
    module.train()
    with torch.no_grad():
        _at(module, _contexts(entry, INIT_BATCH, gen))(_inputs(entry, INIT_BATCH, gen))
    module.eval()
    if perturbed:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(PERTURB_STD * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return entry, module, gen


def _log_abs_det_jacobian(fn, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J, log|det J|)`` of ``fn`` at the single example ``v`` (event shape), on flattened vectors."""
    shape = v.shape

    def flat(u):
        return fn(u.reshape(1, *shape))[0].reshape(-1)

    jac = jacobian(flat, v.reshape(-1), vectorize=True)  # (D, D)
    assert jac.shape[0] == jac.shape[1], f"output size {jac.shape[0]} != input size {jac.shape[1]}"
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0, "singular Jacobian"
    return jac, logabs


NAMES = sorted(ENTRIES)


@pytest.mark.parametrize("perturbed", [False, True], ids=["init", "perturbed"])
@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_and_logdet(name, perturbed):
    entry, module, gen = _prepared(name, perturbed)
    x = _inputs(entry, BATCH, gen)
    c = _contexts(entry, BATCH, gen)
    with torch.no_grad():
        z, ld = _at(module, c)(x)
        x_rec, ld_inv = _at(module.inverse, c)(z)
    assert ld.shape == (BATCH,) and ld_inv.shape == (BATCH,)
    assert x_rec.shape == x.shape
    err = (x_rec - x).abs().max().item()
    assert err <= entry.roundtrip_atol, f"round trip error {err:.3g}"
    assert torch.allclose(ld_inv, -ld, rtol=0, atol=entry.logdet_atol), (ld_inv + ld).abs().max()

    for b in range(BATCH):
        cb = None if c is None else c[b:b + 1]
        with torch.no_grad():  # examples are independent: alone == inside the batch
            z_b, ld_b = _at(module, cb)(x[b:b + 1])
        assert torch.allclose(z_b[0], z[b], rtol=BATCH_TOL, atol=BATCH_TOL)
        assert torch.allclose(ld_b[0], ld[b], rtol=BATCH_TOL, atol=BATCH_TOL)
        j_fwd, ld_ref = _log_abs_det_jacobian(_at(module, cb), x[b])
        assert abs(ld[b].item() - ld_ref.item()) <= entry.logdet_atol, (ld[b].item(), ld_ref.item())
        j_inv, ld_inv_ref = _log_abs_det_jacobian(_at(module.inverse, cb), z[b])
        assert abs(ld_inv[b].item() - ld_inv_ref.item()) <= entry.logdet_atol, (ld_inv[b].item(), ld_inv_ref.item())
        eye = torch.eye(j_fwd.shape[0], dtype=j_fwd.dtype)
        assert torch.allclose(j_inv @ j_fwd, eye, rtol=0, atol=JACOBIAN_PRODUCT_ATOL)


@pytest.mark.parametrize("name", [n for n in NAMES if ENTRIES[n].gradcheck])
def test_gradcheck(name):
    entry, module, gen = _prepared(name, perturbed=True)
    x = _inputs(entry, GRAD_BATCH, gen).requires_grad_()
    c = _contexts(entry, GRAD_BATCH, gen)
    assert torch.autograd.gradcheck(_at(module, c), (x,), fast_mode=True)
    z = _at(module, c)(x)[0].detach().requires_grad_()
    assert torch.autograd.gradcheck(_at(module.inverse, c), (z,), fast_mode=True)
    if c is not None:  # and in the context, at fixed x
        c = c.requires_grad_()
        assert torch.autograd.gradcheck(lambda u: module(x.detach(), u), (c,), fast_mode=True)


def _transform_classes() -> dict[str, type]:
    """Every Transform subclass defined in a module of the package ``stableflows.transforms``."""
    out = {}
    pkg = stableflows.transforms
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Transform) and obj.__module__ == module.__name__:
                out[f"{obj.__module__}.{obj.__qualname__}"] = obj
    out["stableflows.transforms.base.Transform"] = Transform
    return out


def test_every_transform_has_an_entry():
    classes = _transform_classes()
    covered = set()
    for name, entry in ENTRIES.items():
        try:
            covered |= {type(m) for m in entry.build().modules()}
        except Exception as e:  # a broken entry must not hide behind an unrelated traceback
            pytest.fail(f"registry entry {name!r} does not build: {type(e).__name__}: {e}")
    # exclusions are listed, with a reason, in ABSTRACT_BASES of registry.py / registry_*.py and
    # must be real bases: an existing class with at least one subclass among the Transform classes
    for qualname in ABSTRACT_BASES:
        assert qualname in classes, f"ABSTRACT_BASES names {qualname}, which is not a Transform class"
        cls = classes[qualname]
        assert any(c is not cls and issubclass(c, cls) for c in classes.values()), f"{qualname} is not a base class"
    missing = sorted(q for q, c in classes.items() if c not in covered and q not in ABSTRACT_BASES)
    assert not missing, f"Transform classes without a registry entry: {missing}"
