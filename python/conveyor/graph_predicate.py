"""Row predicates of graph steps (`when = "max(small.probabilities) < 0.9"`).

A step with `when` runs only on the rows where the predicate holds. The C++ engine
evaluates a flat form: a list of tests (one tensor, one reduction, one comparison)
and a reverse Polish program combining them with and / or / not, so it never parses
text. This module parses the text once, at config time, with a hand-written tokenizer
and recursive-descent parser (the grammar is small and the messages must point at a
character), and compiles the tree to that flat form once the tensors have slots.

Grammar (docs: the graph contract):
```
expr    := and ("or" and)*
and     := unary ("and" unary)*
unary   := "not" unary | "(" expr ")" | test
test    := operand cmp number | operand ("in" | "not in") "[" number ("," number)* "]"
operand := tensor | tensor "[" int "]" | ("max" | "min" | "argmax") "(" tensor ")"
cmp     := "<" | "<=" | ">" | ">=" | "==" | "!="
```
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.errors import ConfigError

__all__ = ["BoolOp", "Not", "Predicate", "PredicateError", "Test", "parse_predicate"]

COMPARISONS = ("<=", ">=", "==", "!=", "<", ">")
KEYWORDS = ("and", "or", "not", "in", "max", "min", "argmax")
REDUCTIONS = ("max", "min", "argmax")

# A number is tried first: "1e-5" and "-3" are numbers although every character of
# them may appear in a tensor name; a number glued to more name characters ("3d") is a name.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z0-9_.:/-]+")
_INTEGER = re.compile(r"[0-9]+")
_PUNCTUATION = ("(", ")", "[", "]", ",")


class PredicateError(ConfigError):
    """A `when` text that does not parse: where (1-based character), what was expected, what was found."""

    def __init__(self, text: str, position: int, expected: str, found: str) -> None:
        self.text, self.position, self.expected, self.found = text, position, expected, found
        super().__init__(f'when = "{text}": at character {position}, expected {expected}, found {found}')


@dataclass(frozen=True)
class _Token:
    kind: str  # "number", "name", "keyword", "cmp", or the punctuation character itself
    text: str
    position: int  # 1-based character of its start

    def describe(self) -> str:
        return f"'{self.text}'"


@dataclass(frozen=True)
class Test:
    """One comparison of one tensor's row: `reduce(tensor)[element] op values`."""

    tensor: str
    reduce: str  # "value" (the row's only element), "element", "max", "min" or "argmax"
    element: int  # the flattened index for "element", else 0
    op: str  # a comparison, "in" or "not in"
    values: tuple[float, ...]
    position: int  # 1-based character where the test starts, for messages


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" or "or", applied left to right
    left: Node
    right: Node


Node = Test | Not | BoolOp


@dataclass(frozen=True)
class Predicate:
    """A parsed `when`: the tree and its source text."""

    text: str
    root: Node

    @property
    def tests(self) -> list[Test]:
        """The tests, left to right (the order `compile` numbers them)."""
        found: list[Test] = []
        _walk(self.root, found.append, lambda op: None)
        return found

    @property
    def tensors(self) -> set[str]:
        """Names of the tensors the predicate reads."""
        return {test.tensor for test in self.tests}

    def compile(self, slot_of: Callable[[str], int]) -> tuple[list[tuple[int, str, int, str, list[float]]], list[int | str]]:
        """(tests, program) as `_core.Graph` takes them: `slot_of` maps a tensor name to its slot.

        tests: (slot, reduce, element, op, values); program: reverse Polish, an int is test i.
        """
        tests: list[tuple[int, str, int, str, list[float]]] = []
        program: list[int | str] = []

        def add_test(test: Test) -> None:
            program.append(len(tests))
            tests.append((slot_of(test.tensor), test.reduce, test.element, test.op, [float(v) for v in test.values]))

        _walk(self.root, add_test, program.append)
        return tests, program


def _walk(node: Node, on_test: Callable[[Test], None], on_op: Callable[[str], None]) -> None:
    """Post-order traversal: operands before their operator (reverse Polish)."""
    if isinstance(node, Test):
        on_test(node)
    elif isinstance(node, Not):
        _walk(node.operand, on_test, on_op)
        on_op("not")
    else:
        _walk(node.left, on_test, on_op)
        _walk(node.right, on_test, on_op)
        on_op(node.op)


def parse_predicate(text: str) -> Predicate:
    """The predicate `text` as a tree; PredicateError names the character and what was expected."""
    parser = _Parser(text)
    root = parser.expression()
    parser.expect_end()
    return Predicate(text, root)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char.isspace():
            index += 1
            continue
        position = index + 1
        two = text[index : index + 2]
        if two in COMPARISONS[:4]:
            tokens.append(_Token("cmp", two, position))
            index += 2
            continue
        if char in "<>":
            tokens.append(_Token("cmp", char, position))
            index += 1
            continue
        if char in _PUNCTUATION:
            tokens.append(_Token(char, char, position))
            index += 1
            continue
        number = _NUMBER.match(text, index)
        name = _NAME.match(text, index)
        if number and (name is None or name.end() <= number.end()):
            tokens.append(_Token("number", number.group(), position))
            index = number.end()
        elif name:
            word = name.group()
            tokens.append(_Token("keyword" if word in KEYWORDS else "name", word, position))
            index = name.end()
        else:
            expected = "a tensor name, a number, an operator or a parenthesis"
            raise PredicateError(text, position, expected, f"the character '{char}'")
    return tokens


class _Parser:
    """Recursive descent over the tokens; one method per grammar rule."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0

    def peek(self, offset: int = 0) -> _Token | None:
        index = self.index + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def is_keyword(self, word: str, offset: int = 0) -> bool:
        token = self.peek(offset)
        return token is not None and token.kind == "keyword" and token.text == word

    def fail(self, expected: str) -> PredicateError:
        token = self.peek()
        if token is None:
            return PredicateError(self.text, len(self.text) + 1, expected, "the end")
        return PredicateError(self.text, token.position, expected, token.describe())

    def take(self, kind: str, expected: str) -> _Token:
        token = self.peek()
        if token is None or token.kind != kind:
            raise self.fail(expected)
        self.index += 1
        return token

    def expect_end(self) -> None:
        if self.peek() is not None:
            raise self.fail("'and', 'or' or the end")

    def expression(self) -> Node:
        node = self.conjunction()
        while self.is_keyword("or"):
            self.index += 1
            node = BoolOp("or", node, self.conjunction())
        return node

    def conjunction(self) -> Node:
        node = self.unary()
        while self.is_keyword("and"):
            self.index += 1
            node = BoolOp("and", node, self.unary())
        return node

    def unary(self) -> Node:
        if self.is_keyword("not"):
            self.index += 1
            return Not(self.unary())
        token = self.peek()
        if token is not None and token.kind == "(":
            self.index += 1
            node = self.expression()
            self.take(")", "')'")
            return node
        return self.test()

    def test(self) -> Test:
        start = self.peek()
        tensor, reduce, element = self.operand()
        assert start is not None  # operand() consumed at least one token
        token = self.peek()
        if token is not None and token.kind == "cmp":
            self.index += 1
            return Test(tensor, reduce, element, token.text, (self.number(),), start.position)
        if self.is_keyword("in") or (self.is_keyword("not") and self.is_keyword("in", 1)):
            op = "in" if self.is_keyword("in") else "not in"
            self.index += 1 if op == "in" else 2
            self.take("[", "'['")
            values = [self.number()]
            while self.peek() is not None and self.peek().kind == ",":  # type: ignore[union-attr]
                self.index += 1
                values.append(self.number())
            self.take("]", "',' or ']'")
            return Test(tensor, reduce, element, op, tuple(values), start.position)
        raise self.fail("a comparison (<, <=, >, >=, ==, !=), 'in' or 'not in'")

    def operand(self) -> tuple[str, str, int]:
        token = self.peek()
        if token is not None and token.kind == "keyword" and token.text in REDUCTIONS:
            self.index += 1
            self.take("(", f"'(' after {token.text}")
            tensor = self.take("name", "a tensor name").text
            self.take(")", "')'")
            return tensor, token.text, 0
        tensor = self.take("name", "a tensor name, max(, min(, argmax(, not or '('").text
        bracket = self.peek()
        if bracket is None or bracket.kind != "[":
            return tensor, "value", 0
        self.index += 1
        index_token = self.peek()
        if index_token is None or index_token.kind != "number" or not _INTEGER.fullmatch(index_token.text):
            raise self.fail("an element index (an integer >= 0)")
        self.index += 1
        self.take("]", "']'")
        return tensor, "element", int(index_token.text)

    def number(self) -> float:
        return float(self.take("number", "a number").text)
