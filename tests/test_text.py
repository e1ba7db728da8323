import json

import sentencepiece

from moshi_mlx.engine.text import Transcript, Word, token_text


class Pieces:
    """A stand-in for a sentencepiece processor."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def id_to_piece(self, i: int) -> str:
        return self.pieces[i]


def test_token_text_skips_padding():
    sp = Pieces(["<unk>", "▁hello", "lo", "<pad>"])
    assert token_text(sp, 0, padding_id=3) is None
    assert token_text(sp, 3, padding_id=3) is None
    assert token_text(sp, 1, padding_id=3) == " hello"
    assert token_text(sp, 2, padding_id=3) == "lo"


def test_transcript_joins_pieces_into_timed_words():
    t = Transcript(frame_rate=12.5)
    for frame, piece in [(2, " Hel"), (3, "lo"), (5, " "), (6, "wor"), (7, "ld"), (9, " !")]:
        t.add(piece, frame)
    assert t.words == [Word("Hello", 2, 0.16), Word("world", 6, 0.48), Word("!", 9, 0.72)]
    assert t.text == "Hello world !"


def test_transcript_first_piece_starts_a_word():
    t = Transcript(frame_rate=12.5)
    t.add("abc", 0)
    assert t.words == [Word("abc", 0, 0.0)]


def test_real_tokenizer_pieces(demo_dir):
    name = json.loads((demo_dir / "config.json").read_text())["tokenizer_name"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(demo_dir / name))
    ids = sp.encode("hello world")
    t = Transcript(frame_rate=12.5)
    for frame, i in enumerate(ids):
        t.add(token_text(sp, i, padding_id=-1), frame)
    assert t.text == "hello world"
