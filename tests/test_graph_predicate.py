from __future__ import annotations

import pytest

from conveyor.errors import ConfigError
from conveyor.graph_predicate import PredicateError, parse_predicate


def rpn(text: str) -> list[int | str]:
    return parse_predicate(text).compile(lambda name: 0)[1]


def test_contract_example_compiles_to_its_reverse_polish_program() -> None:
    tests, program = parse_predicate("a < 1 and (b > 2 or not c == 3)").compile({"a": 0, "b": 1, "c": 2}.__getitem__)
    assert tests == [(0, "value", 0, "<", [1.0]), (1, "value", 0, ">", [2.0]), (2, "value", 0, "==", [3.0])]
    assert program == [0, 1, 2, "not", "or", "and"]


@pytest.mark.parametrize(
    ("text", "program"),
    [
        ("a < 1 or b < 2 and c < 3", [0, 1, 2, "and", "or"]),  # and binds tighter than or
        ("a < 1 and b < 2 or c < 3", [0, 1, "and", 2, "or"]),
        ("(a < 1 or b < 2) and c < 3", [0, 1, "or", 2, "and"]),
        ("a < 1 and b < 2 and c < 3", [0, 1, "and", 2, "and"]),  # left to right
        ("a < 1 or b < 2 or c < 3", [0, 1, "or", 2, "or"]),
        ("not a < 1 and b < 2", [0, "not", 1, "and"]),  # not binds tightest
        ("not (a < 1 and b < 2)", [0, 1, "and", "not"]),
        ("not not a < 1", [0, "not", "not"]),
        ("((a < 1))", [0]),
    ],
)
def test_precedence_parentheses_and_not(text: str, program: list[int | str]) -> None:
    assert rpn(text) == program


@pytest.mark.parametrize(
    ("text", "test"),
    [
        ("x == 3", ("x", "value", 0, "==", [3.0])),
        ("x[4] != 0", ("x", "element", 4, "!=", [0.0])),
        ("max(p) >= 0.9", ("p", "max", 0, ">=", [0.9])),
        ("min(p) <= -1", ("p", "min", 0, "<=", [-1.0])),
        ("argmax(p) in [1, 3, 5]", ("p", "argmax", 0, "in", [1.0, 3.0, 5.0])),
        ("argmax(p) not in [2]", ("p", "argmax", 0, "not in", [2.0])),
        ("x > 1e-3", ("x", "value", 0, ">", [0.001])),
        ("x > -2.5E+2", ("x", "value", 0, ">", [-250.0])),
        ("x > .5", ("x", "value", 0, ">", [0.5])),
        ("x<-1", ("x", "value", 0, "<", [-1.0])),
        ("small.probabilities > 0", ("small.probabilities", "value", 0, ">", [0.0])),
        ("ns:part/x-y_2 > 0", ("ns:part/x-y_2", "value", 0, ">", [0.0])),
        ("3d > 0", ("3d", "value", 0, ">", [0.0])),  # a number glued to name characters is a name
    ],
)
def test_operands_comparisons_and_numbers(text: str, test: tuple) -> None:
    name, *rest = test
    tests, program = parse_predicate(text).compile({name: 7}.__getitem__)
    assert tests == [(7, *rest)] and program == [0]


def test_tensors_are_the_names_read() -> None:
    predicate = parse_predicate("max(a.p) < 0.5 or (b[2] > 1 and not argmax(a.p) in [0, 1])")
    assert predicate.tensors == {"a.p", "b"}
    assert [test.position for test in predicate.tests] == [1, 20, 37]


def test_compile_asks_the_slot_of_each_test_in_order() -> None:
    asked: list[str] = []
    slots = {"a": 4, "b": 9}

    def slot_of(name: str) -> int:
        asked.append(name)
        return slots[name]

    tests, _ = parse_predicate("b > 1 and a < 2 or b < 0").compile(slot_of)
    assert [test[0] for test in tests] == [9, 4, 9]
    assert asked == ["b", "a", "b"]


@pytest.mark.parametrize(
    ("text", "position", "expected", "found"),
    [
        ("max(a.b) <", 11, "a number", "the end"),
        ("", 1, "a tensor name, max(, min(, argmax(, not or '('", "the end"),
        ("a < b", 5, "a number", "'b'"),
        ("a", 2, "a comparison (<, <=, >, >=, ==, !=), 'in' or 'not in'", "the end"),
        ("a not < 1", 3, "a comparison (<, <=, >, >=, ==, !=), 'in' or 'not in'", "'not'"),
        ("(a < 1", 7, "')'", "the end"),
        ("a < 1)", 6, "'and', 'or' or the end", "')'"),
        ("a < 1 b < 2", 7, "'and', 'or' or the end", "'b'"),
        ("a < 1 AND b < 2", 7, "'and', 'or' or the end", "'AND'"),  # keywords are lower case
        ("MAX(a) < 1", 4, "a comparison (<, <=, >, >=, ==, !=), 'in' or 'not in'", "'('"),
        ("x[1.5] < 1", 3, "an element index (an integer >= 0)", "'1.5'"),
        ("x[-1] < 1", 3, "an element index (an integer >= 0)", "'-1'"),
        ("x[1 < 1", 5, "']'", "'<'"),
        ("x in 1", 6, "'['", "'1'"),
        ("x in []", 7, "a number", "']'"),
        ("x in [1, 2", 11, "',' or ']'", "the end"),
        ("max a < 1", 5, "'(' after max", "'a'"),
        ("max(1) < 2", 5, "a tensor name", "'1'"),
        ("max(a < 2", 7, "')'", "'<'"),
        ("a @ 1", 3, "a tensor name, a number, an operator or a parenthesis", "the character '@'"),
        ("a = 1", 3, "a tensor name, a number, an operator or a parenthesis", "the character '='"),
        ("a < 0.9and b < 1", 5, "a number", "'0.9and'"),
        ("a and", 3, "a comparison (<, <=, >, >=, ==, !=), 'in' or 'not in'", "'and'"),
    ],
)
def test_errors_name_the_character_what_was_expected_and_what_was_found(
    text: str, position: int, expected: str, found: str
) -> None:
    with pytest.raises(PredicateError) as caught:
        parse_predicate(text)
    error = caught.value
    assert (error.position, error.expected, error.found) == (position, expected, found)
    assert str(error) == f'when = "{text}": at character {position}, expected {expected}, found {found}'
    assert isinstance(error, ConfigError)


def test_the_contract_message_example() -> None:
    with pytest.raises(ConfigError, match=r'^when = "max\(a.b\) <": at character 11, expected a number, found the end$'):
        parse_predicate("max(a.b) <")
