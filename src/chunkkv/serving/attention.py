"""A tap on the attention function: lets the engine hooks see each layer's query and key states.

The paged engine computes attention through the function registered in transformers'
``AttentionInterface`` under the model's ``_attn_implementation`` (``"sdpa"`` or ``"paged|eager"``
for continuous batching without flash). Registering a function under a *new* name does not work in
transformers 5.25: the engine refuses any name but those two (or flash) when it starts, and builds
the block-diagonal mask that keeps requests apart only for them. So the tap replaces the two
registered functions with a pass-through wrapper that calls the original unchanged and, **only for
attention modules tagged by** :func:`tag_model`, first hands ``(module, query, key, kwargs)`` to the
module's observer. Untagged modules (any other model in the process) see the original function.

Fragility: the wrapper depends on the attention modules calling the registered function with
``(module, query, key, value, attention_mask, **kwargs)`` after ``cache.update`` (true for every
model family transformers generates from the Llama template) and on the global registry being
read at every forward (it is: ``ALL_ATTENTION_FUNCTIONS.get_interface`` per call).
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

OBSERVER_ATTR = "_chunkkv_serving_observer"
TAPPED_NAMES = ("sdpa", "paged|eager")
_ORIGINALS: dict[str, Callable] = {}


def _make_tap(original: Callable) -> Callable:
    def tapped(module, query, key, value, attention_mask, *args, **kwargs):
        observer = getattr(module, OBSERVER_ATTR, None)
        if observer is not None:
            observer(module, query, key, kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    tapped.__chunkkv_tap__ = True  # type: ignore[attr-defined]
    tapped.__wrapped__ = original  # type: ignore[attr-defined]
    return tapped


def install_tap() -> None:
    """Wrap the registered ``sdpa`` and ``paged|eager`` functions once per process (idempotent)."""
    for name in TAPPED_NAMES:
        current = ALL_ATTENTION_FUNCTIONS[name]
        if getattr(current, "__chunkkv_tap__", False):
            continue
        _ORIGINALS[name] = current
        AttentionInterface.register(name, _make_tap(current))


def remove_tap() -> None:
    """Put the original functions back (for tests; harmless while models are still tagged)."""
    for name, original in list(_ORIGINALS.items()):
        AttentionInterface.register(name, original)
        del _ORIGINALS[name]


def attention_modules(model) -> list:
    """The modules that call the attention function: those with an int ``layer_idx`` whose class
    name ends in ``Attention``."""
    return [
        m for m in model.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
    ]


def tag_model(model, observer: Callable) -> int:
    """Route the attention calls of ``model``'s layers to ``observer``; returns the number of layers tagged."""
    modules = attention_modules(model)
    for m in modules:
        setattr(m, OBSERVER_ATTR, observer)
    return len(modules)


def untag_model(model) -> None:
    for m in attention_modules(model):
        if hasattr(m, OBSERVER_ATTR):
            delattr(m, OBSERVER_ATTR)
