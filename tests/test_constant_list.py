"""ConstantList: a read-only live view (its contract: docs/api.md)."""

from __future__ import annotations

import pytest

from shoal.utils import ConstantList


def test_reads_and_live_view() -> None:
    x = [1, 2, 3]
    c = ConstantList(x)
    assert len(c) == 3 and c[0] == 1 and 2 in c and list(c) == [1, 2, 3]
    assert c[1:] == [2, 3] and type(c[1:]) is list
    assert c.index(3) == 2 and c.copy() == x and c.copy() is not x
    x.append(4)
    assert len(c) == 4 and repr(c) == "ConstantList([1, 2, 3, 4])"


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (lambda c: c.append(1), "Cannot append to a constant list"),
        (lambda c: c.extend([1]), "Cannot extend a constant list"),
        (lambda c: c.insert(0, 1), "Cannot insert into a constant list"),
        (lambda c: c.pop(), "Cannot pop from a constant list"),
        (lambda c: c.remove(1), "Cannot remove from a constant list"),
        (lambda c: c.clear(), "Cannot clear a constant list"),
        (lambda c: c.__setitem__(0, 1), "Cannot set item in a constant list"),
        (lambda c: c.__delitem__(0), "Cannot delete item from a constant list"),
    ],
)
def test_mutations_raise(op, message: str) -> None:
    x = [1, 2]
    with pytest.raises(TypeError, match=message):
        op(ConstantList(x))
    assert x == [1, 2]
