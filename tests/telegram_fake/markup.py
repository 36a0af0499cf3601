"""Telegram's parse modes (HTML, MarkdownV2, Markdown), checked the way the Bot API checks them.

    >>> parse_formatted("*hi* there", "MarkdownV2")
    ('hi there', [{'type': 'bold', 'offset': 0, 'length': 2}])
    >>> parse_formatted("v1.0", "MarkdownV2")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    EntityParseError: Character '.' is reserved and must be escaped with the preceding '\\'

A port of tdlib's parse_html / parse_markdown_v2 / parse_markdown (td/telegram/MessageEntity.cpp),
which is the code the Bot API server runs; error texts and byte offsets follow tdlib's own tests
(test/message_entities.cpp). The Bot API prefixes them with "Bad Request: can't parse entities: ".
Entity offsets and lengths are in UTF-16 code units, as in the Bot API; error offsets are UTF-8
byte offsets into the text as sent.

Not ported: custom emoji in MarkdownV2 (``![👍](tg://emoji?id=…)``), tdlib's handling of a bare
"\\r" as a line break before a block quote, and URL normalisation beyond adding "http://".
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


# --- MarkdownV2 -------------------------------------------------------------------------------

_V2_RESERVED = "_*[]()~`>#+-=|{}.!"
_V2_NAMES = {  # tdlib's names in "Can't find end of … entity"
    "bold": "Bold",
    "italic": "Italic",
    "underline": "Underline",
    "strikethrough": "Strikethrough",
    "spoiler": "Spoiler",
    "code": "Code",
    "pre": "Pre",
    "text_link": "TextUrl",
}


def _v2_ends(kind: str, text: str, i: int) -> bool:
    char, following = text[i], text[i + 1 : i + 2]
    return {
        "bold": char == "*",
        "italic": char == "_" and following != "_",
        "underline": char == "_" and following == "_",
        "strikethrough": char == "~",
        "spoiler": char == "|" and following == "|",
        "code": char == "`",
        "pre": text.startswith("```", i),
        "text_link": char == "]",
    }[kind]


def _v2_unclosed(text: str, entity: _Open) -> EntityParseError:
    name = "PreCode" if entity.kind == "pre" and entity.argument else _V2_NAMES[entity.kind]
    return EntityParseError(
        f"Can't find end of {name} entity at byte offset {_byte_offset(text, entity.position)}"
    )


def parse_markdown_v2(text: str) -> tuple[str, list[dict]]:
    """MarkdownV2: ``*bold* _italic_ __underline__ ~strike~ ||spoiler|| `code` ```pre``` [a](url) >quote``."""
    out = _PlainText()
    entities: list[dict] = []
    stack: list[_Open] = []
    quote: _Open | None = None  # the block quote being read: consecutive lines starting with ">"
    n = len(text)
    i = 0

    def close_quote() -> None:
        nonlocal quote
        if quote is None:
            return
        inner = [e for e in stack if e.position > quote.position]
        if inner:  # an entity opened inside a quote must end inside it
            raise _v2_unclosed(text, inner[-1])
        if out.utf16 > quote.offset:
            entities.append(_entity(quote.kind, quote.offset, out.utf16 - quote.offset))
        quote = None

    while i < n:
        char = text[i]
        in_code = bool(stack) and stack[-1].kind in ("code", "pre")

        if not in_code and (i == 0 or text[i - 1] == "\n"):
            if text.startswith("**>", i):
                close_quote()
                quote = _Open("expandable_blockquote", out.utf16, i, out.mark())
                i += 3
                continue
            if char == ">":
                if quote is None:
                    quote = _Open("blockquote", out.utf16, i, out.mark())
                i += 1
                continue
            close_quote()

        if char == "\\" and i + 1 < n and ord(text[i + 1]) <= 126:
            out.append(text[i + 1])
            i += 2
            continue

        if char not in ("`" if in_code else _V2_RESERVED):
            out.append(char)
            i += 1
            continue

        # "||" at the end of a quote's last line marks the quote expandable, unless it ends a spoiler.
        top_is_spoiler = bool(stack) and stack[-1].kind == "spoiler"
        if quote and not top_is_spoiler and text.startswith("||", i) and text[i + 2 : i + 3] in ("", "\n", "\r"):
            quote.kind = "expandable_blockquote"
            i += 2
            continue

        if stack and _v2_ends(stack[-1].kind, text, i):
            entity = stack.pop()
            i += {"underline": 2, "spoiler": 2, "pre": 3}.get(entity.kind, 1)
            extra: dict[str, str] = {}
            keep = out.utf16 > entity.offset
            if entity.kind == "text_link":
                if text[i : i + 1] == "(":
                    url_start = i + 1
                    close = _find_url_end(text, url_start)
                    if close is None:
                        raise EntityParseError(
                            f"Can't find end of a URL at byte offset {_byte_offset(text, url_start)}"
                        )
                    url = re.sub(r"\\([\x01-\x7e])", r"\1", text[url_start:close])
                    i = close + 1
                else:
                    url = out.since(entity.mark)  # "[telegram.org]" links to its own text
                checked = _checked_url(url)
                keep = keep and checked is not None
                extra["url"] = checked or ""
            if entity.kind == "pre" and entity.argument:
                extra["language"] = entity.argument
            if keep:
                entities.append(_entity(entity.kind, entity.offset, out.utf16 - entity.offset, **extra))
            continue

        start = i
        following = text[i + 1 : i + 2]
        argument = ""
        if char == "_":
            kind = "underline" if following == "_" else "italic"
            i += 2 if following == "_" else 1
        elif char == "|" and following == "|":
            kind, i = "spoiler", i + 2
        elif char in "*~[":
            kind, i = {"*": "bold", "~": "strikethrough", "[": "text_link"}[char], i + 1
        elif text.startswith("```", i):
            kind, i = "pre", i + 3
            language_end = i
            while language_end < n and not text[language_end].isspace() and text[language_end] != "`":
                language_end += 1
            if language_end > i and language_end < n and text[language_end] != "`":
                argument, i = text[i:language_end], language_end
            i += _leading_newline(text, i)
        elif char == "`":
            kind, i = "code", i + 1
        else:
            raise EntityParseError(
                f"Character '{char}' is reserved and must be escaped with the preceding '\\'"
            )
        stack.append(_Open(kind, out.utf16, start, out.mark(), argument))

    if stack:
        raise _v2_unclosed(text, stack[-1])
    close_quote()
    return str(out), _sorted(entities)


def _find_url_end(text: str, i: int) -> int | None:
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and ord(text[i + 1]) <= 126:
            i += 2
        elif text[i] == ")":
            return i
        else:
            i += 1
    return None


def _leading_newline(text: str, i: int) -> int:
    """How many characters of one line break start text[i:] (a pre block drops its first one)."""
    pair = text[i : i + 2]
    if pair in ("\r\n", "\n\r"):
        return 2
    return 1 if pair[:1] in ("\n", "\r") else 0


# --- legacy Markdown ------------------------------------------------------------------------


def parse_markdown(text: str) -> tuple[str, list[dict]]:
    """Legacy Markdown: ``*bold* _italic_ `code` ```pre``` [text](url)``; no nesting."""
    out = _PlainText()
    entities: list[dict] = []
    n = len(text)
    i = 0
    while i < n:
        char = text[i]
        if char == "\\" and i + 1 < n and text[i + 1] in "_*`[":
            out.append(text[i + 1])
            i += 2
            continue
        if char not in "_*`[":
            out.append(char)
            i += 1
            continue

        start = i
        end_char = "]" if char == "[" else char
        is_pre = char == "`" and text.startswith("``", i + 1)
        language = ""
        i += 3 if is_pre else 1
        if is_pre:
            language_end = i
            while language_end < n and not text[language_end].isspace() and text[language_end] != "`":
                language_end += 1
            if language_end > i and language_end < n and text[language_end] != "`":
                language, i = text[i:language_end], language_end
            i += _leading_newline(text, i)

        offset, mark = out.utf16, out.mark()
        while i < n and (text[i] != end_char or (is_pre and not text.startswith("``", i + 1))):
            out.append(text[i])
            i += 1
        if i == n:
            raise EntityParseError(
                f"Can't find end of the entity starting at byte offset {_byte_offset(text, start)}"
            )
        length = out.utf16 - offset
        i += 3 if is_pre else 1
        if char == "[":
            url = out.since(mark)
            if text[i : i + 1] == "(":
                close = text.find(")", i)
                close = n if close < 0 else close
                url, i = text[i + 1 : close], close + 1
            checked = _checked_url(url)
            if length and checked:
                entities.append(_entity("text_link", offset, length, url=checked))
        elif length:
            kind = {"_": "italic", "*": "bold"}.get(char, "pre" if is_pre else "code")
            extra = {"language": language} if language else {}
            entities.append(_entity(kind, offset, length, **extra))
    return str(out), _sorted(entities)


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


_PARSERS = {"html": parse_html, "markdownv2": parse_markdown_v2, "markdown": parse_markdown}
