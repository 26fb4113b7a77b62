"""bootkit.record: the frozen records the initramfs side uses instead of dataclasses, behaving as
``@dataclass(frozen=True)`` does wherever bootkit relies on it."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import pytest

from bootkit.record import FrozenInstanceError, field, record, replace


@record
class Point:
    x: int
    y: int = 0
    label: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataPoint:
    x: int
    y: int = 0
    label: Optional[str] = None
    tags: Dict[str, str] = dataclasses.field(default_factory=dict)


@record
class Checked:
    value: str

    def __post_init__(self) -> None:
        if not self.value:
            raise ValueError("empty")
        object.__setattr__(self, "value", self.value.lower())


def test_constructor_as_a_dataclass() -> None:
    assert Point(1) == Point(x=1, y=0, label=None, tags={})
    assert Point(1, 2, "a").label == "a"
    assert Point(1).tags is not Point(1).tags
    with pytest.raises(TypeError, match="missing argument 'x'"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        Point(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'x'"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 4 arguments"):
        Point(1, 2, "a", {}, 5)  # type: ignore[call-arg]


def test_repr_equality_and_hash_as_a_dataclass() -> None:
    assert repr(Point(1, 2, "a")).replace("Point", "DataPoint") == repr(DataPoint(1, 2, "a"))
    assert Point(1, 2) == Point(1, 2) and Point(1, 2) != Point(2, 1)
    others: tuple[object, ...] = (DataPoint(1), (1, 0, None, {}))
    for other in others:
        assert Point(1) != other
    assert hash(Checked("a")) == hash(Checked("A")) and len({Checked("a"), Checked("A"), Checked("b")}) == 2


def test_frozen_and_replace() -> None:
    p = Point(1, 2)
    with pytest.raises(FrozenInstanceError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.y
    q = replace(p, y=5)
    assert (p.y, q.x, q.y) == (2, 1, 5)
    with pytest.raises(TypeError, match="no field 'z'"):
        replace(p, z=1)


def test_post_init_runs_on_construction_and_replace() -> None:
    assert Checked("ABC").value == "abc"
    with pytest.raises(ValueError, match="empty"):
        Checked("")
    with pytest.raises(ValueError, match="empty"):
        replace(Checked("x"), value="")
