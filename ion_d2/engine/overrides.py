"""
The checks of tools/lazyconfig_train_net.py's config before anything is built: its "key=value"
overrides (:func:`apply_lazy_overrides`: a misspelt key, a word for a number) and its training
length, periods and batch size (:func:`check_lazy_train_config`).
"""

import difflib
import inspect
from collections import abc
from typing import Any, Sequence

from detectron2.config import LazyConfig
from omegaconf import OmegaConf

from ..modeling.builder import is_lazy_call, locate_target

__all__ = ["apply_lazy_overrides", "check_lazy_train_config"]


def apply_lazy_overrides(cfg, overrides: Sequence[str]):
    """
    :meth:`LazyConfig.apply_overrides` (Hydra's "key=value" syntax), which adds any key it is
    given, after checking each override: a key the config does not have is refused with its
    close matches (in a LazyCall node, its target's parameters count as keys; write
    ``+key=value`` to add a new key on purpose), and so is a word where the config holds a
    number or a bool (``train.max_iter=abc``).

    Returns:
        the config, as :meth:`LazyConfig.apply_overrides`.

    Raises:
        ValueError: naming the key, the value and what is accepted.
    """
    # Detectron2 parses the overrides with Hydra in apply_overrides too.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not override.is_add():
            _check_override(cfg, override.key_or_group.split("."), override.value())
    return LazyConfig.apply_overrides(cfg, list(overrides))


def _check_override(cfg, parts: Sequence[str], value: Any) -> None:
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, abc.Mapping):
            return  # a list index, or a value that is no node (apply_overrides refuses it)
        if part not in node:
            last = i == len(parts) - 1
            if not (last and is_lazy_call(node) and _accepts(locate_target(node), part)):
                raise ValueError(_unknown_key(parts, i, node))
            return
        if i < len(parts) - 1:
            node = node[part]
    key, last = ".".join(parts), parts[-1]
    if OmegaConf.is_config(node) and OmegaConf.is_interpolation(node, last):
        return
    old = node[last]
    if isinstance(old, (bool, int, float)) and isinstance(value, str) and "${" not in value:
        kind = {bool: "true or false", int: "an integer"}.get(type(old), "a number")
        raise ValueError(f"{key}={value!r}: {key} takes {kind} (the config has {old!r}).")


def _accepts(target: Any, name: str) -> bool:
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True  # no signature to check against
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _unknown_key(parts: Sequence[str], i: int, node) -> str:
    parent, key = ".".join(parts[:i]), ".".join(parts)
    keys = [k for k in node.keys() if k != "_target_"]
    if is_lazy_call(node):
        try:
            params = inspect.signature(locate_target(node)).parameters.values()
            keys += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            pass
    keys = sorted(set(keys))
    close = difflib.get_close_matches(parts[i], keys, n=3)
    prefix = parent + "." if parent else ""
    hint = f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    return (
        f"{key}: the config has no key {prefix}{parts[i]}.{hint} Keys of "
        f"{parent or 'the config'}: {', '.join(keys)}. To add a new key, write +{key}=..."
    )


def check_lazy_train_config(cfg) -> None:
    """
    Refuse a LazyConfig's training length, periods or batch size that would fail only later
    (a range over a word, a division by zero), before anything is built. Keys the config does
    not have are left to the training loop.

    Raises:
        ValueError: naming the key, its value and the accepted values.
    """
    missing = object()
    for key, low, what in (
        ("train.max_iter", 1, "training iterations"),
        ("train.checkpointer.period", 1, "iterations per checkpoint"),
        ("train.eval_period", 0, "iterations per evaluation; 0: at the end"),
        ("train.log_period", 1, "iterations per log line"),
        ("dataloader.train.total_batch_size", 1, "images per step, all processes"),
    ):
        value = OmegaConf.select(cfg, key, default=missing)
        if value is missing:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low} ({what}); got {value!r}.")
