"""`config.model` for the GPT with all its fields, so that each is settable from the command line.

ml_collections refuses `--config.model.FIELD=...` for a field the config does not hold, so a GPT
config that listed only the fields it changes would hide the others (`--config.model.norm=rmsnorm`
would fail on it). `gpt_model(...)` starts from every constructor field of `models.gpt.GPT` at its
default (an unset optional field is a typed placeholder holding None) and applies the overrides.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from models import gpt

# Not config fields: the compute dtype is `config.dtype`; decoding is switched on by sampling;
# `parent` and `name` belong to Flax.
_NOT_CONFIG = ("dtype", "decode", "parent", "name")


def gpt_model(**overrides: Any) -> ml_collections.ConfigDict:
    """Every GPT field at its default, then `overrides`; `name` is 'gpt'.

    Raises ValueError for an override that is not a GPT field (a typo would otherwise be caught
    only when the config is validated).
    """
    hints = typing.get_type_hints(gpt.GPT)
    fields = {}
    for field in dataclasses.fields(gpt.GPT):
        if field.name in _NOT_CONFIG:
            continue
        value = field.default
        if value is None:  # `int | None` and the like: a placeholder of the non-None type
            (kind,) = [t for t in typing.get_args(hints[field.name]) if t is not types.NoneType]
            value = placeholder(kind)
        fields[field.name] = value
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{unknown} are not fields of models/gpt.py's GPT: {sorted(fields)}.")
    config = ml_collections.ConfigDict({"name": "gpt", **fields})
    config.update(overrides)
    return config
