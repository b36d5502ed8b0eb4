"""The command line both stages share: a jsonargparse parser derived from a config dataclass.

    deepspeed launch/train.py --preset resnet50_imagenet --config my.yaml --lr 0.2 --print-config

jsonargparse reads the flags, ``--config FILE`` (YAML) and the environment ``<prefix><FIELD>`` itself,
checks every value against the field's type, and writes the config back out (``dump``). This module
adds only what the library does not do:

- **presets**: ``--preset NAME`` (a flag, the environment or a config file) names a shipped YAML file whose
  values become the parser's defaults, so they sit below the environment, config files and flags.
  A stage may have a default preset; it stays in force whatever else is given, until
  ``--preset NAME`` picks another or ``--preset none`` the dataclass defaults. The preset in force is logged.
- **flag spelling**: each field is one argument spelled ``--snapshot-url`` and ``--snapshot_url``;
  a boolean takes ``--twa``, ``--no-twa`` or ``--twa=false`` (the library's ``ActionYesNo``).
- **one-line errors naming the flag**, as ValueErrors; the values themselves are checked by the
  dataclass's ``__post_init__``, which also derives what was left unset.
- **--print-config** prints what was set (preset, environment, files, flags), after the dataclass has
  accepted it, as a template: a derived value (the run id, the TWA lr scaled by batch) prints as null and
  stays derived when the file is loaded again with other flags. Credentials are left out.
  (The library's own print-config action exits before the dataclass can check the values and prints secrets.)

The DeepSpeed launcher's ``--local_rank=N`` is accepted and ignored (the rank comes from the environment).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

__all__ = ["parse_config", "build_parser", "preset_names", "load_preset", "PRESETS_DIR", "NO_PRESET"]

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
NO_PRESET = "none"
# Fields never printed nor logged: they may hold credentials.
SECRET_FIELDS = ("storage_options",)


def preset_names(stage: str) -> list[str]:
    """Names of the presets shipped for ``stage`` (`train` or `twa`)."""
    return sorted(p.stem for p in (PRESETS_DIR / stage).glob("*.yaml"))


def load_preset(stage: str, name: str) -> dict[str, Any]:
    """The values of preset ``name``; an unknown name fails listing the valid ones."""
    import yaml

    path = PRESETS_DIR / stage / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"--preset {name!r}: no such preset; valid: {', '.join(preset_names(stage))}, "
                         f"or {NO_PRESET}")
    return yaml.safe_load(path.read_text()) or {}


def flag(name: str) -> str:
    """The flag of field ``name``, as errors and help spell it: ``snapshot_url`` -> ``--snapshot-url``."""
    return "--" + name.replace("_", "-")


def _field_docs(cls: type) -> dict[type, dict[str, str]]:
    """Each dataclass in ``cls``'s MRO (the config and its sections) -> its own fields' docstrings."""
    import docstring_parser

    out = {}
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and klass.__dict__.get("__annotations__"):
            docs = {p.arg_name: p.description or "" for p in docstring_parser.parse_from_object(klass).params}
            out[klass] = {name: docs.get(name, "") for name in klass.__dict__["__annotations__"]}
    return out


class _ConfigFile(ActionConfigFile):
    """``--config FILE``: the library's action, after a check that names the file (and the line) when it
    is missing or not YAML; the library's own message names neither."""

    def __call__(self, parser, cfg, values, option_string=None):
        check_config_file(values)
        super().__call__(parser, cfg, values, option_string)


def check_config_file(path: str) -> None:
    """One-line error naming ``--config FILE`` (and the line) when the file is missing or not YAML."""
    import yaml

    try:
        yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"--config {path}: {where}not valid YAML ({getattr(e, 'problem', None) or e})") from None


def build_parser(cls: type, *, stage: str, prog: str, description: str, env_prefix: str, preset: str = NO_PRESET):
    """A jsonargparse parser with one argument per field of dataclass ``cls``, grouped by the section
    (dataclass) that declares it, with help from the field docstrings; the values of ``preset`` are its
    defaults (below the environment, config files and flags)."""
    epilog = (f"Every flag can also come from the environment as {env_prefix}_<FLAG> (e.g. {env_prefix}_EPOCHS=3). "
              "Precedence: dataclass defaults < preset < environment < --config files and flags, in order.")
    p = ArgumentParser(prog=prog, description=description, epilog=epilog, env_prefix=env_prefix,
                       default_env=True, exit_on_error=False, print_config=None)
    p.add_argument("--config", action=_ConfigFile, help="YAML config file (as --print-config writes it)")
    p.add_argument("--preset", type=str, default=preset,
                   help=f"Start from a shipped preset: {', '.join(preset_names(stage))}, or {NO_PRESET} "
                        "(the dataclass defaults). It stays in force whatever other flags are given.")
    p.add_argument("--print-config", action="store_true",
                   help="Print the config as YAML and exit; derived values print as null and stay derived.")
    p.add_argument("--local_rank", "--local-rank", type=int | None, default=None, help=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    for klass, docs in _field_docs(cls).items():
        group = p.add_argument_group((klass.__doc__ or klass.__name__).strip().splitlines()[0])
        for name, doc in docs.items():
            f = cls.__dataclass_fields__[name]
            default = None if f.default is dataclasses.MISSING else f.default  # required: __post_init__ says so
            kind = hints[name]
            yes_no = {"action": ActionYesNo(no_prefix="no-"), "nargs": "?"} if bool in (kind, *typing.get_args(kind)) \
                else {"type": kind}
            # `literal` marks of the docstrings: plain text in a terminal
            group.add_argument(*dict.fromkeys([flag(name), "--" + name]), dest=name, default=default,
                               help=doc.replace("`", ""), **yes_no)
    if preset != NO_PRESET:
        values = load_preset(stage, preset)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(f"--preset {preset}: unknown keys {unknown} in {PRESETS_DIR / stage / preset}.yaml")
        p.set_defaults(**values)
    return p


def _one_line(err: BaseException) -> str:
    """The library's (often multi-line) message as one line that starts with the flag."""
    msg = " ".join(str(err).split())
    key, sep, rest = msg.partition('": ')
    if key.startswith('Parser key "') and sep:
        return f"{flag(key[len('Parser key ') + 1:])}: {rest}"
    return msg


def _parse(parser, argv: list[str]):
    from argparse import ArgumentError

    try:
        return parser.parse_args(argv)
    except ArgumentError as e:
        raise ValueError(_one_line(e)) from None


def parse_config(cls: type, argv: Sequence[str] | None, *, stage: str, prog: str, description: str,
                 env_prefix: str, default_preset: str = NO_PRESET):
    """Parse argv (and the environment, and config files) into a ``cls`` instance; errors are
    ValueErrors of one line naming the flag. ``--print-config`` prints and exits 0."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def parse_under(preset: str):
        parser = build_parser(cls, stage=stage, prog=prog, description=description, env_prefix=env_prefix,
                              preset=preset)
        return parser, _parse(parser, argv)

    parser, ns = parse_under(default_preset)  # --help shows the default preset's values
    if ns.preset != default_preset:  # another one, named by a flag, the environment or a config file
        parser, ns = parse_under(ns.preset)
    log.info("preset %s in force%s; --preset NAME picks another, --preset %s the plain defaults", ns.preset,
             "" if ns.preset == NO_PRESET else f" (twa_scale/presets/{stage}/{ns.preset}.yaml)", NO_PRESET)
    cfg = cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls) if f.init})
    if ns.print_config:
        names = [name for docs in _field_docs(cls).values() for name in docs]  # in the order of --help
        print(dump_template(parser, ns, names, stage=stage), end="")
        raise SystemExit(0)
    return cfg


def dump_template(parser, ns, names: Sequence[str], *, stage: str) -> str:
    """What was set, as YAML that ``--config`` reads back: the preset and every field, derived ones null."""
    head = f"# twa_scale {stage} config: null values are derived at run time unless set (e.g. run_id)\n"
    kept = Namespace(preset=ns.preset)
    for name in names:
        if name in SECRET_FIELDS and ns[name] is not None:
            head += f"# {name}: omitted (it may hold credentials); set it with {flag(name)} or the environment\n"
        else:
            kept[name] = ns[name]
    return head + parser.dump(kept, skip_unset=False, skip_validation=True)
