"""A JSONL line too long to hold (a `LongLine`, over sources.LONG_LINE bytes), parsed
streaming (docs/DESIGN.md section 11): its document comes out in pieces of at most a read
piece, so memory does not grow with the line. The line is read as UTF-8 and checked as
JSON as `json.loads` checks it; a document is the string of the text field, decoded
piece by piece by `json.loads` itself, cut only between escapes and never inside a
surrogate pair, so the pieces join to what `sources.document_text` gives for the line.
`json.loads` keeps the last of a repeated key: a repeated text field yields RESTART,
after which the document starts again (the caller drops what it had). Whether the line
is a document is known only at its end: BadLine is raised there, after any pieces.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterator

from tvq.corpus.sources import _SURROGATE, BadLine, LongLine

RESTART = object()  # the text field again: what came before is not the document
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STRING_RUN = re.compile(r'(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\Z")
_SCALAR = re.compile(
    r"(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?|true|false|null|NaN|-?Infinity"
)
_SCALAR_LIMIT = 1 << 16  # characters of a number, at most
_KINDS = {"{": "dict", "[": "list", '"': "str", "t": "bool", "f": "bool", "n": "NoneType"}


def long_document(line: LongLine, field: str) -> Iterator[str | object]:
    """The text field of a long JSONL line in pieces (str), RESTART where the field comes
    again; BadLine (after the pieces) where `document_text` would raise it."""
    cursor = _Cursor(_decoded(line))
    cursor.whitespace()
    if cursor.peek() != "{":
        kind = _KINDS.get(cursor.peek(), "")
        cursor.skip_value()
        cursor.end()
        if not kind:
            number = _SCALAR.fullmatch(cursor.scalar or "")
            kind = "int" if number and number[1] and not (number[2] or number[3]) else "float"
        raise BadLine(f"not a JSON object (a {kind})")
    cursor.at += 1
    found = None  # the kind of the field's last value
    cursor.whitespace()
    if cursor.peek() == "}":
        cursor.at += 1
    else:
        while True:
            key = cursor.key(len(field))
            cursor.whitespace()
            if key == field and cursor.peek() == '"':
                if found == "str":
                    yield RESTART
                cursor.at += 1
                yield from cursor.string()
                found = "str"
            elif key == field:
                found = _KINDS.get(cursor.peek(), "number")
                cursor.skip_value()
            else:
                cursor.skip_value()
            if cursor.separator("}"):
                break
    cursor.end()
    if found is None:
        raise BadLine(f"no field {field!r} (--text-field names another)")
    if found != "str":
        raise BadLine(f"field {field!r} is not a string")


def _decoded(line: LongLine) -> Iterator[str]:
    """The line's bytes as text: UTF-8 (a leading byte-order mark dropped), as
    `json.loads` decodes bytes (surrogates encoded in UTF-8 pass, as lone surrogates)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("surrogatepass")
    try:
        for piece in line.pieces():
            if text := decoder.decode(piece):
                yield text
        if text := decoder.decode(b"", final=True):
            yield text
    except UnicodeDecodeError:
        raise BadLine("not JSON (UnicodeDecodeError)") from None


class _Cursor:
    """A position in the decoded line, with the text ahead of it buffered: never more
    than a read piece and what an unfinished escape or number needs."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self.pieces, self.text, self.at = pieces, "", 0
        self.scalar: str | None = None  # the last number or literal skipped

    def fill(self, n: int = 1) -> bool:
        """Whether n characters are ahead (read on until they are, or the line ends)."""
        while len(self.text) - self.at < n:
            piece = next(self.pieces, None)
            if piece is None:
                return False
            self.text = self.text[self.at :] + piece
            self.at = 0
        return True

    def peek(self) -> str:
        return self.text[self.at] if self.fill() else ""

    def whitespace(self) -> None:
        while self.fill():
            self.at = _WHITESPACE.match(self.text, self.at).end()
            if self.at < len(self.text):
                return

    def expect(self, char: str, what: str) -> None:
        self.whitespace()
        if self.peek() != char:
            raise BadLine(f"not JSON (Expecting {what})")
        self.at += 1

    def end(self) -> None:
        """Nothing but whitespace left on the line."""
        self.whitespace()
        if self.fill():
            raise BadLine("not JSON (Extra data)")

    def separator(self, closer: str) -> bool:
        """After a member: True at the closer (consumed), else past the comma."""
        self.whitespace()
        char = self.peek()
        if char == closer:
            self.at += 1
            return True
        if char != ",":
            raise BadLine("not JSON (Expecting ',' delimiter)")
        self.at += 1
        return False

    def key(self, longest: int) -> str | None:
        """An object's key and its colon; None for a key longer than `longest`."""
        self.expect('"', "property name enclosed in double quotes")
        key = ""
        for piece in self.string():
            key = key + piece if key is not None and len(key) + len(piece) <= longest else None
        self.expect(":", "':' delimiter")
        return key

    def string(self) -> Iterator[str]:
        """The decoded pieces of a string whose opening quote is consumed, up to and past
        its closing quote."""
        while True:
            if not self.fill():
                raise BadLine("not JSON (Unterminated string)")
            end = _STRING_RUN.match(self.text, self.at).end()
            stop = end
            if end == len(self.text) or self.text[end] == "\\":  # the run may go on
                if end - self.at >= 6 and _HIGH_SURROGATE.match(self.text, end - 6, end):
                    if _escape_starts(self.text, end - 6, self.at):
                        stop = end - 6  # kept for the low half that may follow
            elif self.text[end] != '"':
                raise BadLine("not JSON (Invalid control character)")
            if stop > self.at:
                yield _decode(self.text[self.at : stop])
                self.at = stop
            if end < len(self.text) and self.text[end] == '"':
                self.at = end + 1
                return
            if end < len(self.text) and len(self.text) - end >= 6:  # room for any escape
                raise BadLine("not JSON (Invalid \\escape)")
            if not self.fill(len(self.text) - self.at + 1):
                raise BadLine("not JSON (Unterminated string)")

    def skip_value(self) -> None:
        """Past one value, checked (objects and arrays on a stack, not by recursion)."""
        closers: list[str] = []
        while True:
            self.whitespace()
            char = self.peek()
            if char in ("{", "["):
                self.at += 1
                closers.append("}" if char == "{" else "]")
                if len(closers) > sys.getrecursionlimit():
                    raise BadLine("not JSON (RecursionError)")
                self.whitespace()
                if self.peek() == closers[-1]:
                    self.at += 1
                    closers.pop()
                elif char == "{":
                    self.key(0)
                    continue
                else:
                    continue
            elif char == '"':
                self.at += 1
                for _ in self.string():
                    pass
            else:
                self.skip_scalar()
            while closers and self.separator(closers[-1]):
                closers.pop()
            if not closers:
                return
            if closers[-1] == "}":
                self.key(0)

    def skip_scalar(self) -> None:
        self.fill(_SCALAR_LIMIT)
        match = _SCALAR.match(self.text, self.at)
        if match is None:
            raise BadLine("not JSON (Expecting value)")
        if match.end() - self.at >= _SCALAR_LIMIT - 1:
            raise BadLine(f"not JSON (a number of over {_SCALAR_LIMIT} characters)")
        integer = match[1] and not (match[2] or match[3])
        if integer and len(match[1].lstrip("-")) > sys.get_int_max_str_digits() > 0:
            raise BadLine("not JSON (ValueError)")  # as int() refuses it
        self.scalar = match[0]
        self.at = match.end()


def _escape_starts(text: str, at: int, floor: int) -> bool:
    """Whether the backslash at `at` starts an escape: an even run of backslashes since
    `floor` (where an escape may start) comes before it."""
    start = at
    while start > floor and text[start - 1] == "\\":
        start -= 1
    return (at - start) % 2 == 0


def _decode(run: str) -> str:
    """Part of a string, whole escapes only, as `json.loads` decodes it; lone surrogates
    become U+FFFD (sources.document_text)."""
    text = json.loads('"' + run + '"')
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text
