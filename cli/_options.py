"""Option help that quotes the library's own defaults, so the command line never restates them."""

from __future__ import annotations

import dataclasses

import click


def default(cls, name: str, recipe: dict | None = None, recipe_name: str = "digits") -> str:
    """``[value]`` for a config field, with the recipe's value beside it where a recipe changes it."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    text = _show(name, field.default)
    if recipe and name in recipe and recipe[name] != field.default:
        text += f"; {recipe_name}: {_show(name, recipe[name])}"
    return f"[{text}]"


def _show(name: str, value) -> str:
    if name == "workers" and value is None:
        return "the CPU cores, at most 8"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) if len(set(value)) > 1 else str(value[0])
    if value is None or value is False:
        return "off"
    if value is True:
        return "on"
    return str(value)


def weights_options(command):
    """``--init`` and ``--pretrained``: where a job's backbone weights come from (generate and transfer)."""
    command = click.option("--init-partial", is_flag=True, default=None,
                           help="Start from --init weights that fit only part of the backbone (the rest stays "
                                "random); without it such a file is refused.")(command)
    command = click.option("--pretrained", is_flag=True, default=None,
                           help="timm's own pretrained weights (from timm's local cache; never downloaded).")(command)
    return click.option("--init", default=None, type=click.Path(dir_okay=False),
                        help="Local backbone weights: safetensors, a timm/torchvision state dict, or a run's "
                             "model.safetensors.")(command)
