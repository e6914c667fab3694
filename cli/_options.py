"""Option help that quotes the library's own defaults, so the command line never restates them."""

from __future__ import annotations

import dataclasses

import click


def default(cls, name: str, recipes: tuple = (), auto: str | None = None) -> str:
    """``[…]`` for a config field: what the auto recipe decides it from (``auto``), the value of each named recipe
    that changes it (``recipes``: (label, dict) pairs), and the class default, labelled "paper" beside them."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    parts = [f"auto: {auto}"] if auto else []
    parts += [f"{label}: {_show(name, recipe[name])}" for label, recipe in recipes
              if name in recipe and recipe[name] != field.default]
    value = _show(name, field.default)
    parts.append(f"paper: {value}" if parts else value)
    return "[" + "; ".join(parts) + "]"


def _show(name: str, value) -> str:
    if name == "workers" and value is None:
        return "the CPU cores, at most 8"
    if name == "settle" and not value:
        return "0, every epoch"
    if name == "vote" and not value:
        return "0, off"
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


def deprecated_alias(command):
    """The artefact or run that a command reads is its first argument; an older ``--flag`` spelling of it still
    works for one release, with a warning. Returns ``resolve(argument, old, flag, name)`` for the command body."""
    def resolve(argument, old, flag: str, name: str):
        if old is not None:
            if argument is not None and argument != old:
                raise click.UsageError(f"give the {name} once: as the first argument ({argument}) or {flag} ({old})")
            click.echo(f"warning: {flag} is deprecated and goes in the next release; give the {name} first: "
                       f"labelkit {command} {name.upper()} …", err=True)
            return old
        return argument
    return resolve
