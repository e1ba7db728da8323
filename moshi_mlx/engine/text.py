"""Moshi's text stream: token ids to printable text, and a transcript timed in frames."""

from dataclasses import dataclass, field

import sentencepiece

PADDING_TOKEN = 0  # besides the config's `existing_text_padding_id`


def token_text(tokenizer: sentencepiece.SentencePieceProcessor, token: int,
               padding_id: int) -> str | None:
    """The text of one token ('▁' turned into a space), or None for padding tokens."""
    if token in (PADDING_TOKEN, padding_id):
        return None
    return tokenizer.id_to_piece(token).replace("▁", " ")


@dataclass
class Word:
    text: str
    frame: int  # step at which its first piece came
    time: float  # seconds: frame / frame rate


@dataclass
class Transcript:
    """Pieces of text joined into words; a piece starting with a space starts a new word."""

    frame_rate: float
    words: list[Word] = field(default_factory=list)
    _space: bool = field(default=True, repr=False)  # the next piece starts a word

    def add(self, piece: str, frame: int) -> None:
        stripped = piece.lstrip(" ")
        new_word = self._space or stripped != piece
        self._space = not stripped
        if not stripped:
            return
        if new_word:
            self.words.append(Word(stripped, frame, round(frame / self.frame_rate, 3)))
        else:
            self.words[-1].text += stripped

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)
