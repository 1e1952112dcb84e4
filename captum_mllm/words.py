"""Words and sentences of a text part, in Unicode grapheme clusters.

Combining marks stay with their letter, emoji with their modifiers, and
zero-width or format characters separate words without being part of one.
Chinese characters (the Han script), written without spaces, are a word
each, as Hugging Face's BERT tokenizers split them. Thai, also written
without spaces and left whole by Unicode's rules, is split into words, and
Japanese into phrases (a word with its particles), by Google's BudouX (small
models, pure Python).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import unicodedata
from typing import Any

import regex

_GRAPHEME = regex.compile(r"\X")
_WORD_BOUNDARY = regex.compile(r"(?wV1)\b")  # Unicode's word boundaries (UAX #29)
_HAN = regex.compile(r"\p{Han}")
_THAI = regex.compile(r"\p{Thai}+")
_KANA = regex.compile(r"[\p{Hiragana}\p{Katakana}]")
#: A letter of a script written without spaces between words
UNSPACED = regex.compile(r"[\p{Han}\p{Thai}\p{Hiragana}\p{Katakana}]")
_APOSTROPHES = "'’"


def is_separator(char: str) -> bool:
    """Whitespace, or an invisible format / control character (e.g. a zero-width space)."""
    return char.isspace() or unicodedata.category(char) in ("Cf", "Cc", "Zl", "Zp", "Zs")


def is_punctuation(char: str) -> bool:
    """A Unicode punctuation character (categories P*): never spoken, never a word."""
    return unicodedata.category(char).startswith("P")


def strip_separators(text: str) -> str:
    """The text without leading and trailing separators (see :func:`is_separator`)."""
    start, end = 0, len(text)
    while start < end and is_separator(text[start]):
        start += 1
    while end > start and is_separator(text[end - 1]):
        end -= 1
    return text[start:end]


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words and punctuation runs of a text.

    Text is read in Unicode grapheme clusters (so a combining accent stays
    with its letter and an emoji with its modifiers). A word is a run of
    clusters that are neither punctuation nor separators (letters, digits,
    marks, symbols, emoji), with the punctuation Unicode's word boundaries
    (UAX #29) keep inside a word (``don't``, ``3.14``, ``2,000``, ``e.g``,
    ``U.S.A``); a Chinese character is a word alone; Thai is cut into words
    and Japanese into phrases by BudouX; a punctuation run is its own span; separators
    (:func:`is_separator`) split spans and belong to none.

    Args:
        text (str): the text of one part.

    Returns:
        list of (start, end): spans in order.

    Examples::

        >>> [("I love 🍕!"[a:b]) for a, b in word_spans("I love 🍕!")]
        ['I', 'love', '🍕', '!']
        >>> [("我爱猫"[a:b]) for a, b in word_spans("我爱猫")]
        ['我', '爱', '猫']
    """
    spans: list[tuple[int, int, str]] = []  # (start, end, kind)
    boundaries = {m.start() for m in _WORD_BOUNDARY.finditer(text)}
    for m in _GRAPHEME.finditer(text):
        base = m.group()[0]
        if all(is_separator(c) for c in m.group()):
            continue
        kind = "punct" if is_punctuation(base) else "word"
        if base in _APOSTROPHES and spans and spans[-1][2] == "word" and spans[-1][1] == m.start():
            kind = "word"  # an apostrophe inside a word, if a word char follows
            nxt = text[m.end() : m.end() + 1]
            if not nxt or is_separator(nxt) or is_punctuation(nxt):
                kind = "punct"
        if kind == "punct" and m.start() not in boundaries and spans and spans[-1][2] == "word":
            kind = "word"  # between two letters or digits (3.14, e.g, U.S.A), or kept at
            # a word's end (Hebrew's geresh: ל׳, ג'; an underscore: foo_)
        if _HAN.match(base):  # a word alone, never joined to its neighbours
            spans.append((m.start(), m.end(), "han"))
        elif spans and spans[-1][2] == kind and spans[-1][1] == m.start():
            spans[-1] = (spans[-1][0], m.end(), kind)
        else:
            spans.append((m.start(), m.end(), kind))
    if _KANA.search(text) is not None:
        spans = _japanese_words(text, spans)
    if _THAI.search(text) is None:
        return [(a, b) for a, b, _ in spans]
    out: list[tuple[int, int]] = []
    for a, b, kind in spans:
        out.extend(_thai_words(text, a, b) if kind == "word" else [(a, b)])
    return out


def _japanese_words(text: str, spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Japanese (a text holding kana) in BudouX's phrases: Unicode's rules
    gave each kanji alone and joined a particle to the next word (東|京|は,
    はとても); a phrase is a word with its particles (東京は, とても).
    Punctuation stays its own span."""
    clusters = {m.end() for m in _GRAPHEME.finditer(text)}
    ends = list(itertools.accumulate(len(chunk) for chunk in _parser("japanese").parse(text)))
    ends = [c for c in ends if c in clusters]  # ascending
    phrase_ends = set(ends)
    out: list[tuple[int, int, str]] = []
    for a, b, kind in spans:
        if kind == "punct":
            out.append((a, b, kind))
            continue
        inner = ends[bisect.bisect_right(ends, a) : bisect.bisect_left(ends, b)]
        for start, end in zip([a, *inner], [*inner, b], strict=True):
            last = out[-1] if out else None
            if last and last[2] == "word" and last[1] == start and start not in phrase_ends:
                out[-1] = (last[0], end, "word")  # 東 and 京, inside one phrase
            else:
                out.append((start, end, "word"))
    return out


def _thai_words(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The word ``text[start:end]`` cut into words where it holds Thai (a run
    of Thai letters was one feature: Unicode's rules leave it whole); cuts
    fall between grapheme clusters only."""
    cuts = set()
    for run in _THAI.finditer(text, start, end):
        cuts |= {run.start(), run.end()}
        at = run.start()
        for word in _parser("thai").parse(run.group()):
            at += len(word)
            cuts.add(at)
    if not cuts:
        return [(start, end)]
    clusters = {m.end() for m in _GRAPHEME.finditer(text, start, end)}
    edges = [start, *sorted(c for c in cuts if start < c < end and c in clusters), end]
    return list(zip(edges, edges[1:], strict=False))


@functools.cache
def _parser(language: str) -> Any:
    import budoux

    return getattr(budoux, f"load_default_{language}_parser")()


#: What one text feature may be (``ChatInput(text_unit=)``, ``--text-unit``).
TEXT_UNITS = ("token", "word", "sentence", "paragraph", "turn")

#: Punctuation that ends a sentence before a separator (Unicode's
#: Sentence_Terminal: also the Devanagari danda ।, Arabic ؟ and ۔, Armenian ։,
#: Ethiopic ።, ...; and …), and (CJK, written without spaces) wherever it stands.
_TERMINAL = regex.compile(r"[\p{Sentence_Terminal}…]")
_CJK_TERMINALS = frozenset("。！？｡")
_LINE_BREAKS = frozenset("\n\r\u2028\u2029")
_LINE_BREAK = regex.compile(r"\r\n|[\n\r\u2028]")  # one line break (CRLF is one)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of a text, each a run of
    :func:`word_spans` up to a punctuation run that ends a sentence (one
    holding ``.``, ``!``, ``?``, ``…`` or another of Unicode's sentence
    terminals, such as ``।`` and ``؟``, before a separator or the text's end;
    ``。``, ``！``, ``？`` anywhere), or up to a line break. As in Unicode's sentence
    boundaries (UAX #29, rule SB8), full stops alone end no sentence when the
    next letter is lowercase (``e.g. this``, ``etc. and``, ``Wait... what``),
    in a text that holds a capital (a lowercase transcript's case tells nothing).
    A rule, not a model: ``3.5`` stays whole; a title before a name (``Dr.
    Smith``, ``Mrs.``, ``Prof.``, ``St.``) or ``e.g.``, ``i.e.``, ``vs.`` and
    ``cf.`` end none, as in ICU's sentence breaks with CLDR's English
    exceptions; other abbreviations before a capital (``Inc. The``) end one,
    as in Unicode's rules. A list
    item's number or letter at the start of a line (``1.``, ``b.``, ``iv.``)
    begins the sentence after it on that line, where Unicode's rules make it
    a sentence of its own.

    Args:
        text (str): the text of one part.

    Returns:
        list of (start, end): spans in order.

    Examples::

        >>> [("Hi there. How are you?"[a:b]) for a, b in sentence_spans("Hi there. How are you?")]
        ['Hi there.', 'How are you?']
    """
    out: list[tuple[int, int]] = []
    start = None
    words = word_spans(text)
    cased = any(c.isupper() for c in text)  # a lowercase transcript: case tells nothing
    for i, (a, b) in enumerate(words):
        start = a if start is None else start
        last = i + 1 == len(words)
        after = "" if last else text[b : words[i + 1][0]]  # separators up to the next span
        # A punctuation run ends it (a word may hold a full stop: 3.14, e.g)
        stop = is_punctuation(text[a])
        ends = stop and (
            any(c in _CJK_TERMINALS for c in text[a:b])
            or (_TERMINAL.search(text, a, b) is not None and (last or after != ""))
        )
        if ends and cased and set(_TERMINAL.findall(text, a, b)) == {"."}:
            ends = not _lowercase_next(text, b) and not _before_a_name(text, words, i)
        broken = any(c in _LINE_BREAKS for c in after)
        if ends or last or broken:
            if last or broken or not _list_marker(text, start, b):
                out.append((start, b))
                start = None
    return out


#: Words that a full stop follows inside a sentence, before a name or an example
#: (the titles and never-final abbreviations of CLDR's English sentence-break
#: exceptions and Moses' English nonbreaking prefixes, less those that often end
#: a sentence: "Inc.", "Jr.", "Bros.").
_BEFORE_A_NAME = frozenset(
    "Mr Mrs Ms Mx Messrs Mme Mlle Dr Drs Prof Rev Hon Msgr St Sen Rep Gov Gen Adm Brig Col "
    "Maj Capt Cmdr Lt Sgt Cpl Pvt e.g i.e vs cf".split()
)


def _before_a_name(text: str, words: list[tuple[int, int]], i: int) -> bool:
    """Whether the full stop at ``words[i]`` closes a title or abbreviation
    written just before it (``Dr.``, ``e.g.``), which begins no sentence after it."""
    if i == 0 or words[i - 1][1] != words[i][0] or words[i][1] - words[i][0] != 1:
        return False
    a, b = words[i - 1]
    return text[a:b] in _BEFORE_A_NAME


#: A numbered or lettered list item's marker: ``1.``, ``(12).``, ``b.``, ``IV.``.
_LIST_MARKER = regex.compile(r"\(?(?:\d{1,3}|\p{L}|[ivxlcdm]{1,6}|[IVXLCDM]{1,6})\)?\.")


def _list_marker(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` is a list item's marker at the start of a line."""
    line = max(text.rfind(c, 0, start) for c in _LINE_BREAKS)
    at_line_start = not text[line + 1 : start].strip()
    return at_line_start and _LIST_MARKER.fullmatch(text, start, end) is not None


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the paragraphs of a text: runs of :func:`word_spans`
    that a blank line (two line breaks, whatever spaces lie between) or
    Unicode's paragraph separator (U+2029) ends, as Markdown reads them (a
    single line break stays inside a paragraph).

    Args:
        text (str): the text of one part.

    Returns:
        list of (start, end): spans in order.

    Examples::

        >>> text = "Passage one.\\nStill one.\\n\\nPassage two."
        >>> [text[a:b] for a, b in paragraph_spans(text)]
        ['Passage one.\\nStill one.', 'Passage two.']
    """
    out: list[tuple[int, int]] = []
    words = word_spans(text)
    for i, (a, b) in enumerate(words):
        gap = text[words[i - 1][1] : a] if i else ""  # the separators before this word
        if not out or len(_LINE_BREAK.findall(gap)) >= 2 or "\u2029" in gap:
            out.append((a, b))
        else:
            out[-1] = (out[-1][0], b)
    return out


def _lowercase_next(text: str, start: int) -> bool:
    """Whether the first letter after ``start`` is lowercase, before any line
    break or sentence punctuation (UAX #29's SB8: no sentence ends there)."""
    for char in text[start:]:
        if char in _LINE_BREAKS or _TERMINAL.match(char):
            return False
        if char.isalpha():
            return char.islower()
    return False


def spoken_word_spans(transcript: str) -> list[tuple[int, int]]:
    """Character spans of the words of a transcript, as an aligner times them:
    the text between spaces, with a Chinese character a word alone and Thai
    cut into words (as in :func:`word_spans`: both are written without
    spaces between words), and punctuation
    kept with the word before it (the word after, at a run's start: ``“你``).

    Args:
        transcript (str): the words spoken.

    Returns:
        list of (start, end): spans in order.

    Examples::

        >>> [("我爱Python。"[a:b]) for a, b in spoken_word_spans("我爱Python。")]
        ['我', '爱', 'Python。']
    """
    out: list[tuple[int, int]] = []
    for chunk in regex.finditer(r"\S+", transcript):
        if not UNSPACED.search(chunk.group()):
            out.append(chunk.span())
            continue
        cuts = {chunk.start(), chunk.end()}
        for a, b in word_spans(chunk.group()):
            if UNSPACED.search(chunk.group(), a, b):
                cuts |= {chunk.start() + a, chunk.start() + b}
        edges = sorted(cuts)
        pieces = list(zip(edges, edges[1:], strict=False))
        words: list[tuple[int, int]] = []
        for a, b in pieces:
            if all(is_punctuation(c) for c in transcript[a:b]) and words:
                words[-1] = (words[-1][0], b)  # 。 after its character
            elif words and all(is_punctuation(c) for c in transcript[words[-1][0] : words[-1][1]]):
                words[-1] = (words[-1][0], b)  # a leading “ before its character
            else:
                words.append((a, b))
        out.extend(words)
    return out
