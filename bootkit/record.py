"""Frozen record classes: what ``@dataclass(frozen=True)`` gives, without importing ``dataclasses``.

``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis`` and ``tokenize``) and writes each class's
methods as source code that it compiles at import time. On a real CPU that is a few milliseconds; in the
initramfs under an emulated CPU the boot paid about half a second for it before it could fetch anything
(docs/initramfs.md, "One Python process"). The records here are built from the class's annotations with
ordinary functions instead: the same constructor (positional or keyword, defaults, ``field(default_factory=)``,
``__post_init__``), equality and hashing over the fields in order, the same ``repr``, and assignment refused.
``replace()`` is ``dataclasses.replace``. Type checkers see them as dataclasses (``dataclass_transform``).
:class:`Choice` is the other value type the boot code's records hold: a closed set of words.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple, Type, TypeVar

if TYPE_CHECKING:
    # for the type checker only (Python 3.11's typing): Python never runs this import
    from typing import dataclass_transform  # novermin
else:

    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        return lambda f: f


T = TypeVar("T")

_MISSING: Any = object()


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a record."""


class _Field:
    __slots__ = ("default_factory",)

    def __init__(self, default_factory: Callable[[], Any]) -> None:
        self.default_factory = default_factory


def field(*, default_factory: Callable[[], T]) -> T:
    """A field whose default is made anew for each record (``dataclasses.field(default_factory=...)``)."""
    made: Any = _Field(default_factory)
    return made  # type: ignore[no-any-return]


#: per record class: (name, default, factory) of each field, in order
_FIELDS = "__record_fields__"


def _fields_of(cls: type) -> Tuple[Tuple[str, Any, Any], ...]:
    fields: Dict[str, Tuple[str, Any, Any]] = {}
    for base in reversed(cls.__mro__[1:]):
        for f in getattr(base, _FIELDS, ()):
            fields[f[0]] = f
    # the class's own annotations (inspect.get_annotations is Python 3.10, and inspect is what this avoids)
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063
        if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
            continue
        default = cls.__dict__.get(name, _MISSING)
        if isinstance(default, _Field):
            fields[name] = (name, _MISSING, default.default_factory)
            delattr(cls, name)
        else:
            fields[name] = (name, default, None)
    return tuple(fields.values())


def _values(obj: Any) -> Tuple[Any, ...]:
    return tuple(getattr(obj, f[0]) for f in getattr(obj, _FIELDS))


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    fields = getattr(cls, _FIELDS)
    if len(args) > len(fields):
        raise TypeError(f"{cls.__name__}() takes {len(fields)} arguments, {len(args)} given")
    values = {fields[i][0]: arg for i, arg in enumerate(args)}
    for name, value in kwargs.items():
        if name in values:
            raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
        values[name] = value
    for name, default, factory in fields:
        if name in values:
            value = values.pop(name)
        elif factory is not None:
            value = factory()
        elif default is not _MISSING:
            value = default
        else:
            raise TypeError(f"{cls.__name__}() missing argument {name!r}")
        object.__setattr__(self, name, value)
    if values:
        raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {next(iter(values))!r}")
    post_init = getattr(self, "__post_init__", None)
    if post_init is not None:
        post_init()


def _repr(self: Any) -> str:
    fields = ", ".join(f"{f[0]}={getattr(self, f[0])!r}" for f in getattr(self, _FIELDS))
    return f"{type(self).__qualname__}({fields})"


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: Type[T]) -> Type[T]:
    """Make ``cls`` a frozen record of its annotated attributes (a class attribute is the default)."""
    setattr(cls, _FIELDS, _fields_of(cls))
    for name, method in (("__init__", _init), ("__repr__", _repr), ("__eq__", _eq), ("__setattr__", _setattr),
                         ("__delattr__", _delattr)):
        if name not in cls.__dict__:
            setattr(cls, name, method)
    if cls.__dict__.get("__hash__") is None:
        setattr(cls, "__hash__", _hash)  # noqa: B010  # mypy refuses assigning to a method
    return cls


def replace(obj: T, **changes: Any) -> T:
    """A copy of the record ``obj`` with ``changes`` (``dataclasses.replace``)."""
    values = {f[0]: getattr(obj, f[0]) for f in getattr(obj, _FIELDS)}
    unknown = set(changes) - set(values)
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {sorted(unknown)[0]!r}")
    values.update(changes)
    return type(obj)(**values)


class Choice(str, enum.Enum):
    """A closed set of words; ``str()`` and f-strings give the word itself on every Python version."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def words(cls) -> Tuple[str, ...]:
        return tuple(str(m.value) for m in cls)
