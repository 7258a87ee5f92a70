"""Config fields on the command line and in the docs: `--set FIELD=VALUE` and its two alias flags,
the parser that points a field spelled as a flag to `--set`, the `--help` epilog listing every field,
and docs/options.md's table (`python -m oelm_ray.core.options`)."""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import re
import textwrap
from dataclasses import fields
from typing import Any

from .config import ConfigError, field_sections, precedence, preset, section_classes, typed

ALIASES = {"max_steps": "--max-steps", "data_dir": "--data-dir"}
"""Field -> flag: `--max-steps N` is `--set max_steps=N`, in `oelm-ray train` and every sweep recipe."""


def add_set_arguments(
    ap: argparse.ArgumentParser, aliases: tuple[str, ...] = tuple(ALIASES), defaults: dict[str, str] | None = None
) -> None:
    """`--set FIELD=VALUE ...` (repeatable) and the alias flags `aliases` names; `defaults`: a field's
    default where the command has its own (a recipe's data_dir: <storage>/data), for the help text."""
    g = ap.add_argument_group("config fields (the list and the precedence: at the end)")
    g.add_argument(
        "--set",
        dest="set",
        nargs="+",
        action="extend",
        default=[],
        metavar="FIELD=VALUE",
        help="set config fields, e.g. --set lr=1e-3 max_steps=2000 (repeatable)",
    )
    for name in aliases:
        g.add_argument(
            ALIASES[name],
            dest=f"alias_{name}",
            default=None,
            metavar=name.upper(),
            help=f"the same as --set {name}={name.upper()}"
            + (f" (default: {defaults[name]})" if name in (defaults or {}) else ""),
        )


def parse_sets(args: argparse.Namespace | list[str], sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """`--set` items and alias flags -> typed flat overrides (one error for a bad item, field or value).

    `args` is parsed arguments (after `add_set_arguments`) or a bare list of FIELD=VALUE items;
    `sections` limits the fields to those sections (`oelm-ray prepare`: data).
    """
    items = args if isinstance(args, list) else args.set
    flat: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ConfigError(f"--set {item!r} must look like FIELD=VALUE, e.g. --set lr=1e-3")
        if key in flat:
            raise ConfigError(f"--set {key}= is given twice ({flat[key]!r} and {value.strip()!r}): keep one")
        flat[key] = value.strip()
    for name, flag in ALIASES.items():
        value = None if isinstance(args, list) else getattr(args, f"alias_{name}", None)
        if value is not None:
            if name in flat:
                raise ConfigError(f"{flag} {value} and --set {name}={flat[name]} set the same field: keep one")
            flat[name] = value
    out = typed(flat)
    where = field_sections()
    outside = [k for k in out if sections and where[k] not in sections]
    if outside:
        raise ConfigError(f"{', '.join(outside)}: not a {'/'.join(sections)} field; this command reads only those")
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, telling a config field spelled as a flag (`--lr 1e-3`) its spelling: `--set lr=1e-3`."""

    def error(self, message: str):  # type: ignore[override]
        flag = re.match(r"unrecognized arguments: (--[\w-]+)", message)
        if flag and flag.group(1)[2:].replace("-", "_") in field_sections():
            name = flag.group(1)[2:].replace("-", "_")
            message = f"{flag.group(1)} is not a flag: set config fields with --set, e.g. --set {name}=VALUE"
        super().error(message)


def fields_help(sections: tuple[str, ...] = ("model", "data", "train"), width: int = 100) -> str:
    """`--help`'s epilog: the precedence, then every field (type, cpu preset's value, docstring)."""
    cpu = preset("cpu").to_dict()
    lines = ["precedence, lowest first (a later layer replaces the fields it names):", precedence(), ""]
    for sec in sections:
        cls = section_classes()[sec]
        docs = field_docs(cls)
        lines.append(f"{sec} fields (--set FIELD=VALUE; the value in brackets is --preset cpu's):")
        for f in fields(cls):
            shown = '""' if cpu[sec][f.name] == "" else cpu[sec][f.name]
            head = f"  {f.name} ({f.type}) [{shown}]  "
            lines += textwrap.wrap(docs.get(f.name, ""), width, initial_indent=head, subsequent_indent=" " * 6)
        lines.append("")
    return "\n".join(lines)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def options_markdown() -> str:
    """docs/options.md's table of config fields, from the field docstrings (`python -m oelm_ray.core.options`)."""
    rows = ["| field | section | cpu | medium-512 | meaning |", "|---|---|---|---|---|"]
    cpu, med = preset("cpu").to_dict(), preset("medium-512").to_dict()
    for sec, cls in section_classes().items():
        docs = field_docs(cls)
        for f in fields(cls):
            rows.append(f"| `{f.name}` | {sec} | {cpu[sec][f.name]} | {med[sec][f.name]} | {docs[f.name]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_markdown())
