"""Feature caching across denoising steps (DeepCache, Ma et al. 2024), for any denoiser a family describes.

Every ``interval``-th call of the denoiser runs it whole and keeps the outputs of its deep modules (the
family's :meth:`~aptp.families.base.ModelFamily.deep_modules`); the calls in between recompute only the
shallow path and reuse those outputs. Sliced experts keep their module paths, so the same caching works on
the dense model and on every expert. Nothing is forked: the deep modules' ``forward`` is wrapped for the
duration of a ``with`` block and restored after it.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .utils import APTPError


def check_interval(interval) -> int:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise APTPError(f"cache_interval must be a positive integer (1: no caching), got {interval!r}")
    return interval


def _first(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()), None)


def _batch_of(args, kwargs) -> int | None:
    first = _first(args, kwargs)
    return first.shape[0] if hasattr(first, "shape") else None


@contextmanager
def feature_cache(model: nn.Module, deep_modules: list[str], interval: int, residual: bool = False):
    """Within the block, ``model`` runs whole on calls 0, interval, 2 * interval, ... and reuses the deep
    modules' outputs of the last whole call in between (with ``residual``, their residuals: a cached module
    returns its new input plus its last output - input). ``interval`` 1 changes nothing. A call whose batch
    differs from the cached one runs whole."""
    check_interval(interval)
    if interval == 1:
        yield
        return
    state = {"calls": 0, "full": True}
    stored: dict[str, tuple[int | None, object]] = {}

    def count(module, args):
        state["full"] = state["calls"] % interval == 0
        state["calls"] += 1

    def caching(path: str, original):
        def forward(*args, **kwargs):
            batch = _batch_of(args, kwargs)
            if not state["full"] and path in stored and stored[path][0] == batch:
                return stored[path][1] + _first(args, kwargs) if residual else stored[path][1]
            output = original(*args, **kwargs)
            stored[path] = (batch, output - _first(args, kwargs) if residual else output)
            return output

        return forward

    modules = [(path, model.get_submodule(path)) for path in deep_modules]
    # A forward set on the instance by someone else (e.g. an offloading hook) is wrapped and put back after.
    previous = [module.__dict__.get("forward") for _, module in modules]
    handle = model.register_forward_pre_hook(count)
    for path, module in modules:
        module.forward = caching(path, module.forward)
    try:
        yield
    finally:
        handle.remove()
        for (_, module), forward in zip(modules, previous):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
