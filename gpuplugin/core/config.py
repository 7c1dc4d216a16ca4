"""Config sections as msgspec Structs: unknown keys refused, the files' camelCase names, each field's range declared
beside it, and every mistake one ConfigError whose message starts with the field's path
(``sharing.timeSlicing.resources[0].replicas: must be an integer from 2 to 24672, got 1``).

msgspec, not pydantic: a fresh interpreter that defines a few nested schemas and validates once peaks at ~14 MB RSS
with msgspec, ~31 MB with pydantic (figures in pyproject.toml); msgspec's errors carry the path, and the declared
range is read back from the schema, which is all a one-line message needs.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, NamedTuple, TypeVar

import msgspec
import msgspec.inspect as mi

from gpuplugin.core.errors import ConfigError
from gpuplugin.core.limits import MAX_CONFIG_VALUES, within_values

__all__ = [
    "ABSOLUTE",
    "MAX_CONFIG_BYTES",
    "AbsolutePath",
    "Section",
    "Text",
    "decode",
    "decode_config",
    "parse_config",
    "word",
]

#: The largest config file read: what a Kubernetes ConfigMap holds (1 MiB). A larger file is refused unread.
MAX_CONFIG_BYTES = 1024 * 1024

T = TypeVar("T")


#: A path from the root, without NUL: the daemon's working directory means nothing on a node.
ABSOLUTE = r"^/[^\x00]*$"
AbsolutePath = Annotated[str, msgspec.Meta(pattern=ABSOLUTE)]
#: Text with something in it besides spaces.
TEXT = r"\S"
Text = Annotated[str, msgspec.Meta(pattern=TEXT)]


class Section(msgspec.Struct, forbid_unknown_fields=True, rename="camel", kw_only=True):
    """One section of a config file: its keys are the fields' camelCase names and no others. Read once, then turned
    into the frozen settings the rest of the code holds."""


def decode_config(data: bytes, source: str) -> str:
    """The text of a config file read as at most ``MAX_CONFIG_BYTES + 1`` bytes; ConfigError if too big or not
    UTF-8."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes (1 MiB, what a ConfigMap holds)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})") from None


def parse_config(text: str, source: str) -> dict[str, Any]:
    """Parse and check the top level of a config file."""
    import yaml  # here: a plugin started without a config file never pays for it (1 MB, tens of ms)

    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping, got {type(data).__name__}")
    if not within_values(data, MAX_CONFIG_VALUES):
        raise ConfigError(f"{source}: holds more than {MAX_CONFIG_VALUES} values once its YAML aliases are expanded")
    return data


#: Booleans as flags and environment variables spell them; ``lax`` decoding reads true/false and 1/0 itself.
_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}


def word(value: object) -> object:
    """A choice or a boolean as a flag may spell it (`` INDEX``, ``yes``): lower case, trimmed; others unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    return _BOOL_WORDS.get(text, text)


#: msgspec's "<problem> - at `$.a.b[0]`" (or "at `key` in `$.a`" for a mapping's key).
_AT = re.compile(r"(?s)(?P<problem>.*?) - at (?P<key>`key` in )?`\$(?P<where>.*)`")
_UNKNOWN = re.compile(r"(?s)Object contains unknown field `(?P<name>.*)`")
_REQUIRED = re.compile(r"(?s)Object missing required field `(?P<name>.*)`")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_MISSING = object()


class _Entry(NamedTuple):
    """A step to one entry of a mapping, by its key: msgspec names only ``[...]``, a message names the key."""

    key: object


Step = str | int | _Entry


def decode(data: object, schema: type[T], path: str = "", *, source: str = "", lax: bool = False) -> T:
    """``data`` (parsed YAML, or flags) read as ``schema``; ConfigError naming the field under ``path`` (and the file,
    ``source``) if it does not fit. ``lax`` also reads numbers and booleans given as text, as flags arrive."""
    try:
        return msgspec.convert(data, schema, strict=not lax)
    except msgspec.ValidationError as exc:
        message = _message(str(exc), data, schema, path, isinstance(exc.__cause__, ConfigError), lax)
        raise ConfigError(f"{source}: {message}" if source else message) from None


#: msgspec's names of YAML's kinds of value.
_KINDS = {"object": "mapping", "array": "list", "null": "nothing"}


def _message(text: str, data: object, schema: type[Any], path: str, checked: bool, lax: bool) -> str:
    """One line from msgspec's error; ``checked``: raised by a schema's own check, whose message names the field
    from the section it checks."""
    match = _AT.fullmatch(text)
    problem, where = (match["problem"], match["where"]) if match else (text, "")
    steps: list[Step] = [name or (int(index) if index.isdigit() else index) for name, index in _STEP.findall(where)]
    bad_key = bool(match and match["key"])
    steps = _entries(text, data, schema, [*steps, "..."] if bad_key else steps, lax)
    unknown = _UNKNOWN.fullmatch(problem)
    missing = _REQUIRED.fullmatch(problem)
    value = _value(data, steps)
    info, why = _type_at(
        mi.type_info(schema), steps, steps[-1].key if bad_key and isinstance(steps[-1], _Entry) else value, key=bad_key
    )
    if checked:
        return f"{_field(path, steps)}.{problem}".lstrip(".")
    if bad_key:
        value = steps[-1].key if isinstance(steps[-1], _Entry) else _MISSING
    if unknown:
        known = ", ".join(sorted(f.encode_name for f in info.fields) if isinstance(info, mi.StructType) else ())
        steps.append(_Entry(unknown["name"]))
        problem, value, why = f"unknown setting (known: {known})", _MISSING, None
    elif missing:
        steps.append(missing["name"])
        problem, value, why = "missing; it has no default", _MISSING, None
    elif bad_key and not isinstance(value, str | int):
        problem, value = "keys must be text", _MISSING
    elif isinstance(info, mi.IntType | mi.FloatType):
        problem = _range(info) or problem
    elif isinstance(info, mi.EnumType | mi.LiteralType):
        choices = [m.value for m in info.cls] if isinstance(info, mi.EnumType) else list(info.values)
        problem = f"must be one of {', '.join(map(str, choices))}"
    elif isinstance(info, mi.BoolType):
        problem = "must be true or false"
    elif isinstance(info, mi.StrType) and why:
        # A described text's description is the rule its pattern and length spell.
        problem, why = f"must be {why}", None
    elif isinstance(info, mi.StrType) and info.pattern in (ABSOLUTE, TEXT) and isinstance(value, str):
        problem = "must be an absolute path" if info.pattern == ABSOLUTE else "must be a non-empty string"
    elif isinstance(info, mi.ListType | mi.DictType) and " of length <= " in problem and isinstance(value, list | dict):
        problem, value, why = f"has {len(value)} entries, at most {info.max_length}", _MISSING, None
    if why:
        problem = f"{problem.split(', got ')[0]} ({why})"
    if value is not _MISSING:
        shown = repr(value)
        problem = problem.split(", got ")[0] + f", got {shown if len(shown) <= 60 else shown[:60] + '…'}"
    problem = problem.replace(" | null`", "`")  # an optional section: None is its default, not a choice
    problem = re.sub(r"`([^`]*)`", lambda m: re.sub(r"\w+", lambda w: _KINDS.get(w[0], w[0]), m[1]), problem)
    problem = problem[:1].lower() + problem[1:]
    field = _field(path, steps)
    return f"{field}: {problem}" if field else problem


def _entries(text: str, data: object, schema: type[Any], steps: list[Step], lax: bool) -> list[Step]:
    """``steps`` with each ``...`` (a mapping's entry) replaced by the key of the first entry that fails alone."""
    for i, step in enumerate(steps):
        mapping = _value(data, steps[:i])
        if step != "..." or not isinstance(mapping, dict):
            continue
        for key, item in mapping.items():
            trial = _replaced(data, steps[:i], {key: item})
            try:
                msgspec.convert(trial, schema, strict=not lax)
            except msgspec.ValidationError as exc:
                if str(exc) == text:
                    data, steps[i] = trial, _Entry(key)
                    break
    return steps


def _replaced(data: Any, steps: list[Step], new: object) -> object:
    """A copy of ``data`` with the value at ``steps`` replaced by ``new``."""
    if not steps:
        return new
    key = steps[0].key if isinstance(steps[0], _Entry) else steps[0]
    if isinstance(data, dict):
        return {**data, key: _replaced(data[key], steps[1:], new)}
    assert isinstance(key, int)  # msgspec's paths index lists with numbers
    copy = list(data)
    copy[key] = _replaced(copy[key], steps[1:], new)
    return copy


def _field(path: str, steps: list[Step]) -> str:
    """``sharing.timeSlicing`` and ``resources``, ``0``: ``sharing.timeSlicing.resources[0]``."""
    return (path + "".join(_step(s) for s in steps)).lstrip(".")


def _step(step: Step) -> str:
    if isinstance(step, _Entry):
        return f".{_config_key(step.key)}"
    return f"[{step}]" if isinstance(step, int) or step == "..." else f".{step}"


def _config_key(key: object) -> str:
    """A mapping's key as it can stand in a path: plain keys as they are, odd ones quoted and cut."""
    text = str(key)
    # Only a plain word stands bare: a key with a dot, colon or bracket would read as part of the path.
    return text if re.fullmatch(r"[\w-]{1,80}", text) else repr(text[:80])


def _value(data: object, steps: list[Step]) -> object:
    """The value at ``steps`` in ``data``, or _MISSING where it cannot be followed (a mapping's ``[...]``)."""
    for step in steps:
        key = step.key if isinstance(step, _Entry) else step
        if isinstance(data, list | tuple):
            data = data[key] if isinstance(key, int) and key < len(data) else _MISSING
        else:
            data = data.get(key, _MISSING) if isinstance(data, dict) else _MISSING
    return data


def _type_at(info: mi.Type, steps: list[Step], value: object, *, key: bool = False) -> tuple[mi.Type, str | None]:
    """The type of ``value`` (``key``: a mapping's key) at ``steps`` in a value of type ``info``, and what its
    declaration says of it (``Meta(description=...)``); of a union, the member of ``value``'s kind."""
    why = None
    last = len(steps) - 1
    for i, step in enumerate([*steps, None]):
        while isinstance(info, mi.Metadata | mi.UnionType):
            if isinstance(info, mi.Metadata):
                why = (info.extra_json_schema or {}).get("description", why)
                info = info.type
            else:
                # The member a step can lead into: a key into a mapping or Struct, an index into a list.
                kinds: tuple[type[mi.Type], ...] = (mi.StructType, mi.DictType)
                if isinstance(step, int):
                    kinds = (mi.ListType, mi.VarTupleType)
                elif step is None:
                    kinds = next((k for t, k in _KIND_OF if isinstance(value, t)), (mi.ListType, mi.VarTupleType))
                members = [t for t in info.types if not isinstance(t, mi.NoneType)] or list(info.types)
                info = next((t for t in members if isinstance(_bare(t), kinds)), members[0])
        if step is None:
            break
        why = None
        if isinstance(info, mi.StructType):
            info = next((f.type for f in info.fields if f.encode_name == step), mi.AnyType())
        elif isinstance(info, mi.DictType):
            info = info.key_type if key and i == last else info.value_type
        elif isinstance(info, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
            info = info.item_type
        else:
            return mi.AnyType(), None
    return info, why


#: The schema types a value of each kind may be meant for, to pick a union's member in a message.
_KIND_OF: tuple[tuple[type, tuple[type[mi.Type], ...]], ...] = (
    (bool, (mi.BoolType,)),
    (int, (mi.IntType, mi.FloatType)),
    (float, (mi.FloatType,)),
    (str, (mi.StrType, mi.LiteralType, mi.EnumType)),
    (dict, (mi.StructType, mi.DictType)),
    (list, (mi.ListType, mi.VarTupleType)),
)


def _bare(info: mi.Type) -> mi.Type:
    return _bare(info.type) if isinstance(info, mi.Metadata) else info


def _range(info: mi.IntType | mi.FloatType) -> str | None:
    """``must be an integer from 1 to 1000``: a number's whole declared range, where msgspec names one bound."""
    kind = "an integer" if isinstance(info, mi.IntType) else "a number"
    if info.ge is not None and info.le is not None:
        return f"must be {kind} from {_number(info.ge)} to {_number(info.le)}"
    low = f"above {_number(info.gt)}" if info.gt is not None else None
    low = f"at least {_number(info.ge)}" if info.ge is not None else low
    high = f"below {_number(info.lt)}" if info.lt is not None else None
    high = f"at most {_number(info.le)}" if info.le is not None else high
    bounds = " and ".join(b for b in (low, high) if b)
    return f"must be {kind} {bounds}" if bounds else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
