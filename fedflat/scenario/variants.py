"""Families of scenario blocks chosen by a tag key (one config class per variant).

An oracle block is chosen by ``name``, a codec block by ``codec``: each variant is its own
pydantic class whose fields are exactly its factory's arguments, so a key of another
variant is an error that names the key, instead of a value that is silently ignored.

``family(...)`` turns the variant classes into the annotated union a schema field uses.
Its errors are located at the YAML key (``client.oracle.eta_f``), not at pydantic's
tagged-union location (``client.oracle.sam.eta_f``), so the loader points at the line.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError


@dataclass
class Family:
    """The variants of one kind of block.

    Attributes:
        label: what a variant is called in messages ("oracle", "codec").
        tag: the key that chooses the variant ("name", "codec").
        variants: tag value -> config class, in the order the reference lists them.
        default: the variant a block without the tag means.
        adapter: validates a block into its variant (set by ``family()``).
    """

    label: str
    tag: str
    variants: dict[str, type[VariantConfig]]
    default: str
    adapter: TypeAdapter[Any] | None = None

    def keys_of(self, name: str) -> list[str]:
        """The keys variant ``name`` takes besides the tag."""
        return [k for k in self.variants[name].model_fields if k != self.tag]


class _DispatchByTag(type(BaseModel)):  # type: ignore[misc]
    """Calling a family's base class builds the variant its tag names.

    So ``OracleConfig(**block)`` works for callers holding a plain block (method presets,
    scripts, tests); the variant classes construct as ordinary pydantic models.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        fam = cls.__dict__.get("__family__")
        if fam is not None:
            return fam.adapter.validate_python(dict(kwargs))
        return super().__call__(*args, **kwargs)


class VariantConfig(BaseModel, metaclass=_DispatchByTag):
    """Base of a family's config classes (a family's own base subclasses this)."""

    model_config = ConfigDict(extra="forbid")
    # Set on the family's base class by ``family()``; read through ``cls.__dict__`` so
    # that the variants, which inherit it, construct normally.
    __family__: ClassVar[Family | None] = None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        fam = cls.__dict__.get("__family__")
        if fam is not None:
            return fam.adapter.validate_python(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    def factory_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the variant's factory: every field but the tag."""
        fam = family_of(type(self))
        return {k: getattr(self, k) for k in type(self).model_fields if k != fam.tag}


def family_of(cls: type) -> Family:
    """The family a config class (its base or one of its variants) belongs to."""
    for klass in cls.__mro__:
        fam = klass.__dict__.get("__family__")
        if fam is not None:
            return fam
    raise TypeError(f"{cls.__name__} belongs to no family")


def _error(kind: str, msg: str, loc: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
    # ``input`` is the whole block, not one value: the loader then adds no "(got ...)".
    return {"type": PydanticCustomError(kind, msg), "loc": loc, "input": block}


def _foreign_key(fam: Family, name: str, key: str, block: dict[str, Any]) -> dict[str, Any]:
    own = fam.keys_of(name)
    msg = (f"not a key of {fam.label} {name!r} "
           f"(its keys: {', '.join(own) if own else f'none besides {fam.tag}'})")
    owners = [n for n in fam.variants if key in fam.keys_of(n)]
    if owners:
        msg += f"; {key} applies to {', '.join(owners)}{' only' if len(owners) == 1 else ''}"
    else:
        close = difflib.get_close_matches(key, own, n=1)
        msg += f" (did you mean {close[0]!r}?)" if close else ""
    return _error(f"{fam.label}_key", msg, (key,), block)


def _validator(fam: Family) -> WrapValidator:
    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, dict):
            return handler(value)
        block = value if fam.tag in value else {**value, fam.tag: fam.default}
        name = block[fam.tag]
        if not isinstance(name, str) or name not in fam.variants:
            close = difflib.get_close_matches(str(name), list(fam.variants), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"unknown {fam.label} {name!r}{hint}; known: {', '.join(fam.variants)}"
            raise ValidationError.from_exception_data(fam.label, [
                _error(f"{fam.label}_name", msg, (fam.tag,), block)])
        fields = fam.variants[name].model_fields
        foreign = [_foreign_key(fam, name, str(k), block) for k in block if k not in fields]
        if foreign:
            raise ValidationError.from_exception_data(fam.label, foreign)
        try:
            return handler(block)
        except ValidationError as exc:
            errors = []
            for e in exc.errors():
                loc = e["loc"][1:] if e["loc"][:1] == (name,) else e["loc"]  # drop the tag
                if e["type"] == "missing":
                    e = _error(f"{fam.label}_missing",
                               f"{loc[-1]} is required for {fam.label} {name}", loc, block)
                errors.append({**e, "loc": loc})
            raise ValidationError.from_exception_data(exc.title, errors) from None

    return WrapValidator(validate)


def family(base: type[VariantConfig], *, label: str, tag: str,
           variants: tuple[type[VariantConfig], ...], default: str) -> Any:
    """Register ``variants`` as the family of ``base`` and return the schema's field type.

    Each variant must declare ``<tag>: Literal["<its name>"]`` with that name as default.
    """
    by_name = {typing.get_args(c.model_fields[tag].annotation)[0]: c for c in variants}
    fam = Family(label=label, tag=tag, variants=by_name, default=default)
    spec = Annotated[
        Union[variants],  # type: ignore[valid-type]  # noqa: UP007 - built from the tuple
        Field(discriminator=tag),
        _validator(fam),
    ]
    fam.adapter = TypeAdapter(spec)
    type.__setattr__(base, "__family__", fam)
    return spec

