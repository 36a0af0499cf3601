"""Telegram's HTML parse mode, checked the way the Bot API checks it.

    >>> parse_formatted("<b>hi</b> there", "HTML")
    ('hi there', [{'type': 'bold', 'offset': 0, 'length': 2}])
    >>> parse_formatted("<think>", "HTML")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    EntityParseError: Unsupported start tag "think" at byte offset 0

A port of tdlib's parse_html (td/telegram/MessageEntity.cpp),
which is the code the Bot API server runs; error texts and byte offsets follow tdlib's own tests
(test/message_entities.cpp). The Bot API prefixes them with "Bad Request: can't parse entities: ".
Entity offsets and lengths are in UTF-16 code units, as in the Bot API; error offsets are UTF-8
byte offsets into the text as sent.

Not ported: MarkdownV2 and Markdown (selfcog sends only HTML; a request in those modes gets an
HTTP 500 that names the gap), and URL normalisation beyond adding "http://".
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

__all__ = ["EntityParseError", "UnsupportedParseMode", "parse_formatted", "utf16_length"]


class EntityParseError(ValueError):
    """Markup Telegram refuses; ``str(error)`` is the part after "can't parse entities: "."""


class UnsupportedParseMode(ValueError):
    """A parse_mode Telegram doesn't know ("Bad Request: unsupported parse_mode")."""


def parse_formatted(text: str, parse_mode: str | None) -> tuple[str, list[dict]]:
    """The plain text and entities Telegram makes of ``text`` under ``parse_mode``.

        >>> parse_formatted("<b>hi</b>", "HTML")
        ('hi', [{'type': 'bold', 'offset': 0, 'length': 2}])
    """
    if not parse_mode:
        return text, []
    parser = _PARSERS.get(parse_mode.lower())  # the Bot API accepts any letter case
    if parse_mode.lower() in NOT_PORTED:
        raise NotImplementedError(f"FakeTelegram parses only HTML, not {parse_mode}")
    if parser is None:
        raise UnsupportedParseMode(parse_mode)
    return parser(text)


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units, the unit of Telegram's entity offsets: ``utf16_length("🏟") == 2``."""
    return len(text.encode("utf-16-le")) // 2


def _byte_offset(text: str, index: int) -> int:
    return len(text[:index].encode("utf-8"))


class _PlainText:
    """The text being produced, with its running length in UTF-16 code units."""

    def __init__(self) -> None:
        self._chars: list[str] = []
        self.utf16 = 0

    def append(self, char: str) -> None:
        self._chars.append(char)
        self.utf16 += utf16_length(char)

    def mark(self) -> int:
        return len(self._chars)

    def since(self, mark: int) -> str:
        return "".join(self._chars[mark:])

    def __str__(self) -> str:
        return "".join(self._chars)


@dataclass
class _Open:
    """An entity whose start marker was read and whose end marker wasn't yet."""

    kind: str
    offset: int  # UTF-16 offset in the plain text
    position: int  # index of the start marker in the source, for error messages
    mark: int  # _PlainText.mark() at the start, for "the link text is the URL"
    argument: str = ""


def _entity(kind: str, offset: int, length: int, **extra: str) -> dict:
    return {"type": kind, "offset": offset, "length": length, **extra}


# tdlib's order for entities covering the same span (get_entity_type_priority)
_PRIORITY = {
    "blockquote": 0, "expandable_blockquote": 1, "pre": 11, "code": 20, "text_link": 49,
    "bold": 90, "italic": 91, "underline": 92, "strikethrough": 93, "spoiler": 94, "custom_emoji": 99,
}  # fmt: skip


def _sorted(entities: list[dict]) -> list[dict]:
    """Telegram's order: by offset, longer (outer) first, then by type priority."""
    return sorted(entities, key=lambda e: (e["offset"], -e["length"], _PRIORITY.get(e["type"], 50)))


_URL_WITH_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:\S+")
_DOMAIN = re.compile(r"[^\s/?#]+\.[a-zA-Z]{2,}(?:[/?#]\S*)?")


def _checked_url(url: str) -> str | None:
    """The URL Telegram would keep for a link, or None where it silently drops the link."""
    if _URL_WITH_SCHEME.fullmatch(url):
        return url
    if _DOMAIN.fullmatch(url):
        return "http://" + url
    return None


# --- HTML -----------------------------------------------------------------------------------

_HTML_TAGS = {
    "a", "b", "strong", "i", "em", "u", "ins", "s", "strike", "del",
    "span", "tg-spoiler", "tg-emoji", "code", "pre", "blockquote",
}  # fmt: skip
_HTML_ENTITY_TYPES = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline",
    "ins": "underline", "s": "strikethrough", "strike": "strikethrough", "del": "strikethrough",
    "span": "spoiler", "tg-spoiler": "spoiler",
}  # fmt: skip
_NAMED_CHARACTERS = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}  # all Telegram decodes
_NAME_TOKEN = set(string.ascii_letters + string.digits + ".-")


def parse_html(text: str) -> tuple[str, list[dict]]:
    """Telegram's HTML: b/strong, i/em, u/ins, s/strike/del, tg-spoiler, a href, code, pre, blockquote."""
    out = _PlainText()
    entities: list[dict] = []
    stack: list[_Open] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "&":
            decoded, end = _decode_html_entity(text, i)
            if decoded is not None:
                out.append(decoded)
                i = end
                continue
        if char != "<":
            out.append(char)
            i += 1
            continue

        begin = i
        i += 1
        if _at(text, i) != "/":  # a start tag
            while not _is_space(_at(text, i)) and _at(text, i) != ">":
                i += 1
            if _at(text, i) == "\0":
                raise EntityParseError(f"Unclosed start tag at byte offset {_byte_offset(text, begin)}")
            tag = text[begin + 1 : i].lower()
            if tag not in _HTML_TAGS:
                raise EntityParseError(f'Unsupported start tag "{tag}" at byte offset {_byte_offset(text, begin)}')
            i, argument = _read_attributes(text, i, tag, begin)
            if tag == "span" and argument != "tg-spoiler":
                raise EntityParseError(
                    f'Tag "span" must have class "tg-spoiler" at byte offset {_byte_offset(text, begin)}'
                )
            stack.append(_Open(tag, out.utf16, begin, out.mark(), argument))
            i += 1  # past ">"
            continue

        # an end tag
        if not stack:
            raise EntityParseError(f"Unexpected end tag at byte offset {_byte_offset(text, begin)}")
        while not _is_space(_at(text, i)) and _at(text, i) != ">":
            i += 1
        end_name = text[begin + 2 : i].lower()
        while _at(text, i) != "\0" and _is_space(_at(text, i)):
            i += 1
        if _at(text, i) != ">":
            raise EntityParseError(f"Unclosed end tag at byte offset {_byte_offset(text, begin)}")
        i += 1
        opened = stack.pop()
        if end_name and end_name != opened.kind:  # "</>" closes whatever is open
            raise EntityParseError(
                f"Unmatched end tag at byte offset {_byte_offset(text, begin)}, "
                f'expected "</{opened.kind}>", found "</{end_name}>"'
            )
        if out.utf16 > opened.offset:
            _add_html_entity(entities, opened, out)

    if stack:
        raise EntityParseError(f'Can\'t find end tag corresponding to start tag "{stack[-1].kind}"')
    for entity in entities:
        entity.pop("_language", None)
    return str(out), _sorted(entities)


def _at(text: str, k: int) -> str:
    """text[k], or NUL past the end: tdlib's C strings read a NUL there, and its checks rely on it."""
    return text[k] if k < len(text) else "\0"


def _is_space(char: str) -> bool:
    return char in " \t\r\n\v\0"  # tdlib's is_space, NUL included


def _read_attributes(text: str, i: int, tag: str, begin: int) -> tuple[int, str]:
    """Reads a start tag's attributes up to its ">"; returns that position and the tag's argument."""
    argument = ""
    while _at(text, i) != ">":
        while _at(text, i) != "\0" and _is_space(_at(text, i)):
            i += 1
        if _at(text, i) == ">":
            break
        if _at(text, i) == "\0":
            raise EntityParseError(f"Unclosed start tag at byte offset {_byte_offset(text, begin)}")
        name_start = i
        while not _is_space(_at(text, i)) and _at(text, i) not in "=>":
            i += 1
        name = text[name_start:i].lower()
        if not name:
            raise EntityParseError(
                f'Empty attribute name in the tag "{tag}" at byte offset {_byte_offset(text, begin)}'
            )
        while _at(text, i) != "\0" and _is_space(_at(text, i)):
            i += 1
        if _at(text, i) != "=":  # a bare attribute, like <blockquote expandable>
            if tag == "blockquote" and name == "expandable":
                argument = "expandable"
            continue
        i += 1
        while _at(text, i) != "\0" and _is_space(_at(text, i)):
            i += 1
        if _at(text, i) == "\0":
            raise EntityParseError(f'Unclosed start tag "{tag}" at byte offset {_byte_offset(text, begin)}')
        if _at(text, i) in "'\"":
            i, value = _read_quoted(text, i)
        else:  # an unquoted name token: letters, digits, "." and "-"
            token_start = i
            while _at(text, i) in _NAME_TOKEN:
                i += 1
            value = text[token_start:i].lower()
            if not _is_space(_at(text, i)) and _at(text, i) != ">":
                raise EntityParseError(
                    f"Unexpected end of name token at byte offset {_byte_offset(text, token_start)}"
                )
        if _at(text, i) == "\0":
            raise EntityParseError(f"Unclosed start tag at byte offset {_byte_offset(text, begin)}")
        if (tag, name) in (("a", "href"), ("span", "class"), ("tg-emoji", "emoji-id")):
            argument = value
        elif tag == "code" and name == "class" and value.startswith("language-"):
            argument = value[len("language-") :]
    return i, argument


def _read_quoted(text: str, i: int) -> tuple[int, str]:
    """Reads a quoted attribute value starting at its quote; returns the position after it and the value."""
    quote_char = text[i]
    i += 1
    value: list[str] = []
    while _at(text, i) not in (quote_char, "\0"):
        decoded, end = _decode_html_entity(text, i) if text[i] == "&" else (None, i)
        if decoded is None:
            decoded, end = text[i], i + 1
        value.append(decoded)
        i = end
    if _at(text, i) == quote_char:
        i += 1
    return i, "".join(value)


def _add_html_entity(entities: list[dict], opened: _Open, out: _PlainText) -> None:
    offset, length = opened.offset, out.utf16 - opened.offset
    tag = opened.kind
    last = entities[-1] if entities else None
    same_span = last is not None and (last["offset"], last["length"]) == (offset, length)
    if tag in _HTML_ENTITY_TYPES:
        entities.append(_entity(_HTML_ENTITY_TYPES[tag], offset, length))
    elif tag == "a":
        url = _checked_url(opened.argument or out.since(opened.mark))
        if url:
            entities.append(_entity("text_link", offset, length, url=url))
    elif tag == "tg-emoji":
        entities.append(_entity("custom_emoji", offset, length, custom_emoji_id=opened.argument))
    elif tag == "blockquote":
        kind = "expandable_blockquote" if opened.argument == "expandable" else "blockquote"
        entities.append(_entity(kind, offset, length))
    elif tag == "pre" and same_span and last["type"] == "code" and last.get("_language"):
        # <pre><code class="language-x">…</code></pre> is one pre block in language x
        entities[-1] = _entity("pre", offset, length, language=last["_language"])
    elif tag == "pre":
        entities.append(_entity("pre", offset, length))
    elif tag == "code" and same_span and last["type"] == "pre" and opened.argument:
        last["language"] = opened.argument
    else:  # code
        entities.append(_entity("code", offset, length, _language=opened.argument))


def _decode_html_entity(text: str, pos: int) -> tuple[str | None, int]:
    """Decodes "&lt;", "&#60;", "&#x3c;" (";" optional) at pos; (None, pos) where Telegram keeps "&" as is."""
    n = len(text)
    end = pos + 1
    if text[end : end + 1] == "#":
        end += 1
        hexadecimal = text[end : end + 1] == "x"
        end += hexadecimal
        digits = string.hexdigits if hexadecimal else string.digits
        start = end
        while end < n and text[end] in digits:
            end += 1
        value = int(text[start:end], 16 if hexadecimal else 10) if end > start else 0
        if value == 0 or value >= 0x10FFFF or end - pos >= 10:
            return None, pos
        if 0xD800 <= value <= 0xDFFF:  # half a surrogate pair: not a character at all
            raise EntityParseError(
                "Text contains invalid Unicode characters after decoding HTML entities, "
                "check for unmatched surrogate code units"
            )
        decoded = chr(value)
    else:
        while end < n and text[end] in string.ascii_letters:
            end += 1
        decoded = _NAMED_CHARACTERS.get(text[pos + 1 : end])
        if decoded is None:
            return None, pos
    if text[end : end + 1] == ";":
        end += 1
    return decoded, end


_PARSERS = {"html": parse_html}
NOT_PORTED = {"markdownv2", "markdown"}  # Telegram has them; selfcog sends only HTML
