"""FLAN-style template sets: several phrasings of one task, one chosen per example.

A template set is a YAML file with `templates` (a list of `{prompt, target}` pairs written
like `data.prompt` / `data.target`: `{column}` placeholders, literal braces as `{{ }}`), the
`fields` its phrasings read and a `description`. The library ships in `configs/templates/`
(summarization, qa, classification, translation, instruction); `data.template` names one of
those or gives the path of a file of one's own, whose phrasings may name any columns.
`data.columns` maps a set's fields to the data's own column names (`{text: dialogue}`).

Each example gets one phrasing, fixed for the run: `random` draws it from a generator seeded
by (seed, row), `cycle` takes the phrasings in turn. FLAN trains on many phrasings of each
task so that the model learns the task, not one wording of it.
"""
from __future__ import annotations

import dataclasses
import os
import string

import numpy as np
import yaml

from jpeft.errors import ConfigError, DataError

MODES = ("random", "cycle")


@dataclasses.dataclass(frozen=True)
class TemplateSet:
    name: str
    path: str
    phrasings: tuple[tuple[str, str], ...]  # (prompt, target) templates
    description: str = ""

    def fields(self) -> list[str]:
        """The fields any phrasing fills (see `tokenize.template_fields`)."""
        from jpeft.data.tokenize import template_fields
        return list(dict.fromkeys(f for pair in self.phrasings for t in pair for f in template_fields(t)))

    def columns(self) -> list[str]:
        """The row columns any phrasing reads."""
        from jpeft.data.tokenize import column
        return list(dict.fromkeys(map(column, self.fields())))

    def choose(self, n: int, mode: str = "random", seed: int = 0) -> list[int]:
        """The phrasing of each of n rows."""
        if mode == "cycle":
            return [i % len(self.phrasings) for i in range(n)]
        return [int(np.random.default_rng((seed, i)).integers(len(self.phrasings))) for i in range(n)]

    def check_columns(self, columns: list[str], where: str) -> None:
        """Every column the phrasings read is among the data's `columns`, or an error naming the set."""
        missing = [c for c in self.columns() if c not in columns]
        if missing:
            raise DataError(f"template set {self.name!r} ({self.path}) reads column(s) {', '.join(missing)}, which "
                            f"data file '{where}' lacks (its columns: {', '.join(columns)}); say which column holds "
                            f"each with data.columns, e.g. {{{missing[0]}: <column>}}")

    def renamed(self, columns: dict[str, str] | None) -> "TemplateSet":
        """The same set reading the data's own columns: `columns` maps a field to the column that holds it."""
        if not columns:
            return self
        unknown = sorted(set(columns) - set(self.columns()))
        if unknown:
            raise ConfigError(f"data.columns maps {', '.join(unknown)}, which template {self.name!r} ({self.path}) "
                              f"does not read; its fields are {', '.join(self.columns())}")
        phrasings = tuple(tuple(_rename(t, columns) for t in pair) for pair in self.phrasings)
        return dataclasses.replace(self, phrasings=phrasings)


def library_dir() -> str:
    """configs/templates of the checkout jpeft runs from (a built wheel carries it as jpeft/templates)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    packaged = os.path.join(here, "templates")
    return packaged if os.path.isdir(packaged) else os.path.join(os.path.dirname(here), "configs", "templates")


def available() -> list[str]:
    """The names of the library's template sets."""
    folder = library_dir()
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []


def load_template_set(spec: str) -> TemplateSet:
    """A library name (`summarization`) or the path of a YAML file."""
    path = spec if spec.endswith((".yaml", ".yml")) or os.sep in spec else os.path.join(library_dir(), spec + ".yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"data.template={spec!r}: no such template set; the library has "
                          f"{', '.join(available()) or 'none'} (configs/templates/), or give the path of a YAML file")
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"template set '{path}' is not valid YAML: {e}") from None
    phrasings = raw.get("templates") if isinstance(raw, dict) else None
    if not isinstance(phrasings, list) or not phrasings:
        raise ConfigError(f"template set '{path}' needs `templates:`, a list of {{prompt, target}} pairs")
    pairs = []
    for i, item in enumerate(phrasings, 1):
        if not isinstance(item, dict) or set(item) != {"prompt", "target"} or not all(
                isinstance(v, str) for v in item.values()):
            raise ConfigError(f"template set '{path}' phrasing {i} must have exactly a prompt and a target "
                              f"string, got {item!r}")
        pairs.append((item["prompt"], item["target"]))
    ts = TemplateSet(name, path, tuple(pairs), str(raw.get("description", "")))
    fields = raw.get("fields")
    if fields is not None and sorted(set(fields)) != sorted(ts.columns()):
        raise ConfigError(f"template set '{path}' declares fields {fields} but its phrasings read "
                          f"{ts.columns()}; make them agree")
    return ts


def _rename(template: str, columns: dict[str, str]) -> str:
    """The template with each `{field...}` placeholder reading `columns[field]` instead."""
    out = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        head, sep, rest = _split_field(name)
        out.append("{" + columns.get(head, head) + sep + rest + (f"!{conversion}" if conversion else "")
                   + (f":{spec}" if spec else "") + "}")
    return "".join(out)


def _split_field(name: str) -> tuple[str, str, str]:
    """`a.b` / `a[0]` -> (`a`, `.`, `b`) / (`a`, `[`, `0]`)."""
    cut = min((i for i in (name.find("."), name.find("[")) if i >= 0), default=len(name))
    return name[:cut], name[cut:cut + 1], name[cut + 1:]
