"""Generate the scenario key reference (Markdown) from the schema's field descriptions.

``python -m fedflat.scenario.reference`` prints it; the README embeds it, and a test checks
that the README lists every key.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from types import UnionType
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fedflat.scenario.schema import Scenario


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, UnionType):
        for arg in typing.get_args(annotation):
            sub = _submodel(arg)
            if sub is not None:
                return sub
    return None


def _has_other_forms(annotation: Any) -> bool:
    """A block that may also be written as a scalar or None (then the key itself has a row)."""
    if typing.get_origin(annotation) not in (typing.Union, UnionType):
        return False
    return any(_submodel(a) is None for a in typing.get_args(annotation))


def _type_name(annotation: Any) -> str:
    """A reader's name for a field's type: unions as "a or b", Annotated metadata dropped,
    a nested model as the keys it takes (``{kind: 'trace', path}``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        keys = []
        for name, fld in annotation.model_fields.items():
            lit = typing.get_args(fld.annotation) \
                if typing.get_origin(fld.annotation) is typing.Literal else ()
            keys.append(f"{name}: {lit[0]!r}" if len(lit) == 1 else name)
        return "{" + ", ".join(keys) + "}"
    if isinstance(annotation, type):
        return annotation.__name__
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return repr(annotation).replace("typing.", "").replace("NoneType", "None")


def _variants(fld: FieldInfo) -> dict[str, type[BaseModel]]:
    """A union tagged by a key (one class per variant, fedflat.scenario.variants):
    tag value -> class; empty for any other field."""
    tag = fld.discriminator
    if not isinstance(tag, str):
        return {}
    return {typing.get_args(c.model_fields[tag].annotation)[0]: c
            for c in typing.get_args(fld.annotation)}


def iter_keys(
    model: type[BaseModel] = Scenario, prefix: str = ""
) -> Iterator[tuple[str, str, str, str]]:
    """(key path, type, default, description) for every leaf key, depth first.

    A union tagged by a key (oracles by ``name``, codecs by ``codec``) gives
    ``<block>.<tag>`` and the keys every variant takes once, then each variant's own keys
    as ``<block> (<variant>).<key>``.
    """
    for name, fld in model.model_fields.items():
        key = f"{prefix}{name}"
        variants = _variants(fld)
        if variants:
            tag = str(fld.discriminator)
            default = fld.default_factory() if fld.default_factory else fld.default  # type: ignore[call-arg, misc]
            each = "; ".join(f"{v}: {c.model_fields[tag].description.rstrip('.')}"
                             for v, c in variants.items() if c.model_fields[tag].description)
            desc = " ".join(d for d in (fld.description, each and f"({each})") if d)
            yield (f"{key}.{tag}", f"one of {list(variants)}", repr(getattr(default, tag)),
                   desc.replace("\n", " "))
            # Keys every variant takes (privacy.sample_level's epsilon, a codec's
            # error_feedback) are listed once, then each variant's own.
            shared = set.intersection(*(set(c.model_fields) for c in variants.values()))
            first = next(iter(variants.values()))
            yield from (row for row in iter_keys(first, f"{key}.")
                        if row[0].split(".")[-1] in shared - {tag})
            for value, cls in variants.items():
                yield from (row for row in iter_keys(cls, f"{key} ({value}).")
                            if row[0].split(".")[-1] not in shared)
            continue
        sub = _submodel(fld.annotation)
        if sub is not None:
            if _has_other_forms(fld.annotation):  # `availability: 0.8`, `asynchronous: null`
                yield (key, _type_name(fld.annotation), repr(fld.default),
                       (fld.description or "").replace("\n", " "))
            yield from iter_keys(sub, key + ".")
            continue
        if fld.default is not PydanticUndefined:
            default = repr(fld.default)
        elif fld.default_factory is not None:
            default = repr(fld.default_factory())  # type: ignore[call-arg]
        else:
            default = "required"
        yield key, _type_name(fld.annotation), default, (fld.description or "").replace("\n", " ")


def markdown() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, desc in iter_keys():
        rows.append(f"| `{key}` | {typ.replace('|', '/')} | `{default}` "
                    f"| {desc.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _inline(block: dict[str, Any]) -> str:
    """A block as YAML flow items: ``name: sam, rho: 0.1``, nested blocks in braces."""
    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + _inline(v) + "}"
        return str(v).lower() if isinstance(v, bool) else str(v)

    return ", ".join(f"{k}: {value(v)}" for k, v in block.items())


def presets_markdown() -> str:
    """What each ``method:`` preset sets (``fedflat.scenario.local_rule.PRESETS``)."""
    from fedflat.scenario.local_rule import PRESETS

    rows = ["| method | client.oracle | client.correction | server | server.swa |",
            "|---|---|---|---|---|"]
    for name, p in PRESETS.items():
        cells = [_inline(p.get("oracle", {})), _inline(p.get("correction", {})) or "none",
                 _inline(p.get("server", {})), _inline(p["swa"]) if "swa" in p else "off"]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


START, END = "<!-- scenario-reference:start -->", "<!-- scenario-reference:end -->"
PRESETS_START, PRESETS_END = "<!-- method-presets:start -->", "<!-- method-presets:end -->"


def _replace(text: str, start: str, end: str, body: str) -> str:
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a] + "\n" + body + text[b:]


def write_into(path: str) -> None:
    """Replace the text between the markers of ``path`` (key reference, method presets)
    with fresh tables."""
    from pathlib import Path

    text = _replace(Path(path).read_text(), START, END, markdown())
    if PRESETS_START in text:
        text = _replace(text, PRESETS_START, PRESETS_END, presets_markdown())
    Path(path).write_text(text)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write_into(sys.argv[2])
    else:
        print(markdown(), end="")
