"""pgwarden.example.toml names every setting of gateway/settings.py, at its default: the
list of settings is taken from the model itself, so the example cannot drift from it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic.fields import FieldInfo

from gateway.reload import RELOADABLE, flat_settings
from gateway.settings import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "pgwarden.example.toml"
_SECTION = re.compile(r"^\[(\w+)\]\s*$")
_COMMENTED = re.compile(r"^#\s?(\w+) = ")


def _commented_settings() -> dict[str, str]:
    """`# key = value` lines, by dotted name: settings with no value by default."""
    section = ""
    found: dict[str, str] = {}
    for line in EXAMPLE.read_text().splitlines():
        if m := _SECTION.match(line):
            section = m.group(1) + "."
        elif m := _COMMENTED.match(line):
            found[section + m.group(1)] = line
    return found


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PGWARDEN_"):
            monkeypatch.delenv(name)


def test_example_names_every_setting_and_nothing_else() -> None:
    model = flat_settings(Settings.model_construct())
    active = flat_settings(load_settings(EXAMPLE))
    set_in_file = set(_flat_toml(tomllib.loads(EXAMPLE.read_text())))
    commented = set(_commented_settings())
    assert not set_in_file & commented, set_in_file & commented
    assert sorted(set_in_file | commented) == sorted(model), "settings missing or stale"
    assert active.keys() == model.keys()


def test_example_values_are_the_defaults() -> None:
    defaults = flat_settings(Settings())
    loaded = flat_settings(load_settings(EXAMPLE))
    assert loaded == defaults
    # What is commented out has no constant default: none, or one found at run time.
    fields = _fields()
    for key in _commented_settings():
        field = fields[key]
        assert field.default is None or field.default_factory is not None, key


def test_example_marks_exactly_the_reloadable_settings() -> None:
    """A comment saying (reload) covers the settings right below it."""
    section = ""
    marked = set()
    reload_block = False
    previous_was_comment = False
    for line in EXAMPLE.read_text().splitlines():
        is_comment = line.startswith("#")
        if m := _SECTION.match(line):
            section = m.group(1) + "."
            reload_block = False
        elif is_comment and not _COMMENTED.match(line):
            starts_block = not previous_was_comment
            has_mark = "(reload)" in line and "marked (reload)" not in line
            reload_block = has_mark if starts_block else reload_block or has_mark
        elif (m := re.match(r"^#?\s?(\w+) = ", line)) and reload_block:
            marked.add(section + m.group(1))
        elif not line.strip():
            reload_block = False
        previous_was_comment = is_comment and not _COMMENTED.match(line)
    model = set(flat_settings(Settings.model_construct()))
    assert marked == RELOADABLE & model


def _flat_toml(table: dict[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat_toml(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _fields() -> dict[str, FieldInfo]:
    from pydantic import BaseModel

    out: dict[str, FieldInfo] = {}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, subfield in annotation.model_fields.items():
                out[f"{name}.{sub}"] = subfield
        else:
            out[name] = field
    return out
