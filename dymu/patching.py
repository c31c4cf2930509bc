"""Instance patches that put back exactly what was there before.

dymu replaces methods on instances only, never on classes. Whatever the instance held
before (nothing, someone's wrapper, accelerate's hook) is kept beside the patch and put back
by :func:`unpatch`; the patch itself reaches it through :func:`call_prior`.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator
from typing import Any

_MISSING = object()


def _key(name: str) -> str:
    return f"_dymu_prior_{name}"


def patch(obj: Any, name: str, func: Callable, bind: bool = True) -> None:
    """Set ``obj.<name>`` to ``func`` (bound to ``obj`` unless ``bind=False``); idempotent
    per name: a second patch keeps the first prior.

    A wrapper that takes only ``(self, *args, **kwargs)`` shows the signature of the class's
    method it stands in for: libraries read it (``generate()`` picks the arguments it hands a
    VLM's feature methods from their signatures)."""
    if _key(name) not in obj.__dict__:
        obj.__dict__[_key(name)] = obj.__dict__.get(name, _MISSING)
    replaced = getattr(type(obj), name, None)
    if bind and callable(replaced) and _passes_everything(func):
        func = _copy(func)  # a module-level wrapper may stand in on several classes
        func.__signature__ = inspect.signature(replaced)
    obj.__dict__[name] = types.MethodType(func, obj) if bind else func


def _copy(func: types.FunctionType) -> types.FunctionType:
    """A second function object with ``func``'s code, closure and defaults."""
    out = types.FunctionType(
        func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__
    )
    out.__kwdefaults__, out.__doc__ = func.__kwdefaults__, func.__doc__
    out.__dict__.update(func.__dict__)
    return out


def _passes_everything(func: Callable) -> bool:
    """``func(self, *args, **kwargs)`` with no signature of its own."""
    if not isinstance(func, types.FunctionType) or "__signature__" in func.__dict__:
        return False
    kinds = [p.kind for p in inspect.signature(func).parameters.values()]
    return kinds == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ]


def unpatch(obj: Any, name: str) -> None:
    """Put back what ``obj.<name>`` was before :func:`patch` (no-op when not patched)."""
    prior = obj.__dict__.pop(_key(name), None)
    if prior is None:
        return
    if prior is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = prior


def call_prior(obj: Any, name: str, *args, **kwargs):
    """Call what ``obj.<name>`` was before the patch: an instance attribute, else the class's."""
    prior = obj.__dict__.get(_key(name), _MISSING)
    if prior is _MISSING:
        return getattr(type(obj), name)(obj, *args, **kwargs)
    return prior(*args, **kwargs)


@contextlib.contextmanager
def temporarily(obj: Any, name: str, func: Callable) -> Iterator[None]:
    """``obj.<name>`` is ``func`` (unbound) inside the block, exactly as before after it."""
    had = name in obj.__dict__
    before = obj.__dict__.get(name)
    obj.__dict__[name] = func
    try:
        yield
    finally:
        if had:
            obj.__dict__[name] = before
        else:
            obj.__dict__.pop(name, None)


def named_arguments(func: Callable, obj: Any, args: tuple, kwargs: dict) -> dict:
    """Every argument of a call ``func(obj, *args, **kwargs)`` (``func`` a method of ``obj``'s
    class) by name, so a patched method can read and change them whatever the caller's style."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(func).bind_partial(obj, *args, **kwargs).arguments
    named = {k: v for k, v in bound.items() if k != "self"}
    named.update(named.pop("kwargs", {}))
    return named
