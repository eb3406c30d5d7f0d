"""`ConstantList`: a read-only view of a list (its contract: docs/api.md)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Generic, NoReturn, TypeVar, overload

T = TypeVar("T")


class ConstantList(Sequence[T], Generic[T]):
    """A read-only view of `x` (no copy): mutations of `x` show through; every mutating
    method raises `TypeError`. Slicing returns a plain list."""

    def __init__(self, x: list[T]) -> None:
        self._x = x

    def _refuse(self, what: str) -> NoReturn:
        raise TypeError(f"Cannot {what} a constant list")

    def append(self, item: T) -> NoReturn:
        self._refuse("append to")

    def extend(self, item: Any) -> NoReturn:
        self._refuse("extend")

    def insert(self, index: int, item: T) -> NoReturn:
        self._refuse("insert into")

    def pop(self, index: int = -1) -> NoReturn:
        self._refuse("pop from")

    def remove(self, item: T) -> NoReturn:
        self._refuse("remove from")

    def clear(self) -> NoReturn:
        self._refuse("clear")

    def __setitem__(self, index: Any, value: Any) -> NoReturn:
        self._refuse("set item in")

    def __delitem__(self, index: Any) -> NoReturn:
        self._refuse("delete item from")

    def index(self, item: T, start: int = 0, stop: int | None = None) -> int:
        return self._x.index(item, start, len(self._x) if stop is None else stop)

    @overload
    def __getitem__(self, item: int) -> T: ...

    @overload
    def __getitem__(self, item: slice) -> list[T]: ...

    def __getitem__(self, item: int | slice) -> T | list[T]:
        return self._x[item]

    def __iter__(self) -> Iterator[T]:
        return iter(self._x)

    def __contains__(self, item: object) -> bool:
        return item in self._x

    def __len__(self) -> int:
        return len(self._x)

    def copy(self) -> list[T]:
        return self._x.copy()

    def __repr__(self) -> str:
        return f"ConstantList({self._x!r})"
