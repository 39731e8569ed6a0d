"""Config plumbing shared by every YAML schema of the project (training configs, the MLP and LM
trainers, search spaces): a strict pydantic base model, one-line validation errors with a
'did you mean' hint, and a YAML reader that refuses duplicate keys."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails

from sparsify.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    # allow_inf_nan=False: `lr: .inf` is a typo to report, not a run to diverge
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `lr: true` as 1.0; YAML's `1e-3` (a string) stays accepted
        if info.field_name is not None and _boolean_for_a_number(
            cls.model_fields[info.field_name].annotation, value
        ):
            raise ValueError("expected a number, not a boolean")
        return value


def _options(annotation: Any) -> tuple[Any, ...]:
    """The types a field accepts: union members, with `Annotated[...]` metadata stripped."""
    if typing.get_origin(annotation) is Annotated:
        return _options(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, UnionType):
        return tuple(option for member in typing.get_args(annotation) for option in _options(member))
    return (annotation,)


def _boolean_for_a_number(annotation: Any, value: Any) -> bool:
    """True when `value` is a boolean (or a list holding one) where the annotation wants numbers."""
    options = _options(annotation)
    if isinstance(value, bool):
        return bool not in options and any(option in (int, float) for option in options)
    if isinstance(value, list):
        item_types = [
            typing.get_args(o)[0] for o in options if typing.get_origin(o) is list and typing.get_args(o)
        ]
        return any(_boolean_for_a_number(item_type, item) for item_type in item_types for item in value)
    return False


def yaml_on_off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted `on` / `off` as true / false: give choice fields their word back."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


Seed = Annotated[int, Field(ge=0, lt=2**32)]
"""A seed every generator (numpy, Optuna) accepts."""
SAFE_NAME = r"^[A-Za-z0-9_+=,-][A-Za-z0-9_.+=,-]*$"
"""A folder name that stays inside its parent: no '/', no leading '.' (so no '..')."""


def _format_error(err: ErrorDetails, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    if err["type"] == "extra_forbidden":
        parent_fields = _fields_at(model, err["loc"][:-1])
        close = difflib.get_close_matches(str(err["loc"][-1]), parent_fields, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; allowed: {', '.join(parent_fields)}"
        return f"{loc}: unknown field{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_text = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{loc or '<top level>'}: {msg}{got_text}"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at `loc` (for 'did you mean' hints); a `dict[str, Model]`
    section (search-space arms, searched distributions) consumes one key of `loc`."""
    current: Any = model
    for part in loc:
        if isinstance(current, tuple):  # ("item", Model): `part` is a dict key or list index
            current = current[1]
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _section_type(field.annotation)
        if current is None:
            return []
    if isinstance(current, tuple):
        return []
    return list(current.model_fields)


def _section_type(annotation: Any) -> Any:
    """The pydantic model a field holds (through Optional), ("item", Model) for a dict or list
    of models, or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (dict, list):  # one key or index of `loc`, then a model
        value = _section_type(typing.get_args(annotation)[-1])
        return ("item", value) if isinstance(value, type) else None
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def validate_model(model: type[M], raw: Any, source: str) -> M:
    """Validate `raw` as `model`, turning pydantic's errors into one line per problem.

    Raises:
        ConfigError: one line, `source: field.path: what is allowed` (problems joined by "; "),
            with a 'did you mean' hint for an unknown field.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        # an unknown field usually explains a "Field required" next to it: list it first
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        problems = [_format_error(e, model) for e in errors]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML keeps the last one, so a pasted `lr:` line would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: PyYAML merges it
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if not isinstance(key, typing.Hashable):
                continue
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping.

    Raises:
        ConfigError: missing file, a syntax error or a key given twice (with file and line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data
