"""Kyutai TTS's script and state machine, in plain Python (no MLX): a script becomes words to
speak (`Entry`), and at each step `StateMachine.process` turns the model's text choice ("a new
word starts" or "pad") into the text token the model is fed next, forcing each word's tokens
in, capping and adding padding, queueing the lookahead word of the second text stream, and
noting when each word starts (the transcript) and when the script is done (`end_step`).

The rules and numbers are those of PyTorch `moshi` 0.2.13's `moshi/models/tts.py`, checked
step by step against it in tests/test_tts_parity.py.
"""

import re
from collections import deque
from dataclasses import dataclass, field


class ScriptError(ValueError):
    """A script that cannot be spoken; the message says what and where."""


class NoWords(ScriptError):
    """A text with no word in it (nothing to speak)."""


@dataclass(frozen=True)
class TokenIds:
    """Text ids of Kyutai's TTS models. `card` is the text vocabulary plus one (`text_card + 1`),
    the base of the second stream's multiplexing: fed token = (second + 1) * card + first."""

    card: int
    new_word: int = 0
    main: int = 1
    other: int = 2
    pad: int = 3
    zero: int = -1  # embeds to zeros (nothing on that stream)


@dataclass
class Entry:
    """One word to speak: its text tokens (a speaker token first when it starts a turn) and
    `padding`, steps during which no next word may start. A break is an entry without tokens
    (the transcript keeps it only if it has a text)."""

    tokens: list[int]
    text: str
    padding: int = 0


@dataclass
class State:
    """Where one generation stands: words left, padding counters, tokens still to feed on the
    main and the lookahead stream, and what happened (`transcript`: (word, step) at which each
    word, or break with a text, started; `end_step`: the step at which the model asked for a
    word past the last)."""

    entries: deque
    remaining_padding: int
    forced_padding: int
    queued: deque = field(default_factory=deque)
    lookahead_queued: deque = field(default_factory=deque)
    end_step: int | None = None
    consumption_times: list[int] = field(default_factory=list)
    transcript: list[tuple[str, int]] = field(default_factory=list)
    closed: bool = True
    """False while more words may come (streaming text): running out of words then pads."""

    def tokens_ahead(self, ahead: int) -> list[int]:
        """The tokens of the `ahead`-th word still queued (breaks not counted), or []."""
        words = [e for e in self.entries if e.tokens]
        return words[ahead - 1].tokens if len(words) >= ahead else []


@dataclass(frozen=True)
class StateMachine:
    """Kyutai TTS's rules: `max_padding` pads at most in a row before the next word is forced,
    `initial_padding` pads first; with `second_stream_ahead` n > 0 the second text stream carries
    the tokens of the n-th next word (and the "new word" signal)."""

    token_ids: TokenIds
    second_stream_ahead: int = 0
    max_padding: int = 8
    initial_padding: int = 2

    def new_state(self, entries) -> State:
        return State(entries=deque(entries), remaining_padding=self.initial_padding,
                     forced_padding=self.initial_padding)

    def _choice(self, state: State, token: int) -> int:
        """The model's choice, overruled where the rules decide: new word or pad."""
        ids = self.token_ids
        if state.queued or state.forced_padding > 0:
            return ids.pad
        if state.remaining_padding <= 0:
            return ids.new_word
        return token if token in (ids.new_word, ids.pad) else ids.pad

    def _start_word(self, step: int, state: State) -> int:
        """The model asked for a word: takes the next entry (or ends) -> the resulting choice."""
        ids = self.token_ids
        if not state.entries:
            if not state.closed:  # the next words have not arrived yet: wait
                return ids.pad
            if state.end_step is None:
                state.end_step = step
                if self.second_stream_ahead:  # signals the end once on the second stream
                    return ids.new_word
            return ids.pad
        entry = state.entries.popleft()
        state.consumption_times.append(step)
        state.forced_padding = entry.padding
        if entry.text:  # a word, or a break with a text (Kyutai's server's)
            state.transcript.append((entry.text, step))
        if not entry.tokens:  # a break: padding only
            return ids.pad
        state.queued.extend(entry.tokens)
        if self.second_stream_ahead:
            state.lookahead_queued.extend(state.tokens_ahead(self.second_stream_ahead))
        state.remaining_padding = self.max_padding
        return ids.new_word

    def process(self, step: int, state: State, token: int) -> tuple[int, bool]:
        """The model sampled text `token` at `step` -> (text token to feed at the next step,
        whether a new entry was taken)."""
        ids = self.token_ids
        choice = self._choice(state, token)
        taken = len(state.consumption_times)
        if choice == ids.new_word:
            choice = self._start_word(step, state)
        consumed = len(state.consumption_times) > taken
        if choice == ids.pad:
            state.remaining_padding = max(state.remaining_padding - 1, 0)
            state.forced_padding = max(state.forced_padding - 1, 0)
            output = state.queued.popleft() if state.queued else ids.pad
        else:
            output = ids.new_word
        if not self.second_stream_ahead:
            return output, consumed
        second = ids.zero
        if output == ids.new_word:  # the signal goes to the second stream, the word starts
            second = ids.new_word
            output = state.queued.popleft() if state.queued else ids.pad
        elif state.lookahead_queued:
            second = state.lookahead_queued.popleft()
        return (second + 1) * ids.card + output, consumed


def normalized(text: str) -> str:
    """Kyutai's scripts' text: `’` as `'`, `:` as a space, no parentheses."""
    return text.replace("’", "'").replace(":", " ").replace("(", "").replace(")", "")


def word_padding(tokens: list[int], padding_between: int) -> int:
    """The padding forced after a word of `tokens` (see `script_to_entries`)."""
    return max(0, padding_between + len(tokens) - 1) if padding_between > 0 else 0


BREAK = re.compile(r"<break\s+time=\"([^\"]*)\"\s*/?>")
"""SSML's break, the one tag Kyutai's scripts take: `<break time="1.5s"/>`."""
SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?s")


def script_to_entries(encode, token_ids: TokenIds, frame_rate: float, script: list[str],
                      multi_speaker: bool = True, padding_between: int = 0,
                      max_break_seconds: float | None = None) -> list[Entry]:
    """Turns a script into the words to speak.

    `script`: the turns, alternating between the main and the other speaker (an empty first turn
    starts with the other); `encode(word) -> list[int]` is the text tokenizer. Words are split
    on whitespace; `:` separates like a space, `(` and `)` are dropped, `’` becomes `'`.
    `<break time="1.5s"/>` inserts about that much silence (padding steps at `frame_rate`).
    With `multi_speaker`, the first word of a turn whose speaker changes starts with the
    speaker's token. `padding_between` > 0 forces that much padding after a word (plus one step
    per token after its first). A break longer than `max_break_seconds` (None: no limit) is
    that long. Raises `ScriptError` for a break whose time is not seconds.
    """
    speakers = [token_ids.main, token_ids.other]
    entries: list[Entry] = []
    last_speaker = None
    for turn, line in enumerate(script):
        speaker = turn % len(speakers)
        first = True
        line = normalized(line)
        pieces = BREAK.split(line)  # text, time, text, time, ..., text
        for i, piece in enumerate(pieces):
            if i % 2 == 1:
                if not SECONDS.fullmatch(piece.strip()):
                    raise ScriptError(f"turn {turn + 1}: a break needs a time in seconds, "
                                      f"like <break time=\"1.5s\"/>, got time=\"{piece}\"")
                seconds = float(piece.strip()[:-1])
                if max_break_seconds is not None:
                    seconds = min(seconds, max_break_seconds)
                steps = int(round(seconds * frame_rate))
                entries.append(Entry(tokens=[], text="", padding=steps))
                continue
            for word in piece.split():
                tokens = list(encode(word))
                if not tokens:
                    raise ScriptError(f"turn {turn + 1}: the tokenizer gives no token for "
                                      f"{word!r}")
                if first:
                    if multi_speaker and last_speaker != speaker:
                        last_speaker = speaker
                        tokens.insert(0, speakers[speaker])
                    first = False
                entries.append(Entry(tokens, word, word_padding(tokens, padding_between)))
    return entries


SERVER_BREAK = re.compile(r"<break\s+time=\"([0-9.]+)s\"\s*/>")  # Kyutai's server's


def server_text_to_entries(encode, token_ids: TokenIds, frame_rate: float, text: str,
                           first_token: int | None = None, padding_between: int = 0,
                           max_break_seconds: float | None = None) -> list[Entry]:
    """One `Text` message of Kyutai's server's protocol -> its words, as that server reads it
    (moshi-server's `tts_preprocess.rs`), where it differs from `script_to_entries`: en dashes
    are dropped; only a whole `<break time="1.5s"/>` is a break (another tag is words, one whose
    time is no number is dropped), of max(floor(min(seconds, max_break_seconds) * frame_rate),
    1) steps (none for 0 s; None: no cap), with a text of its own, `<break time="1.50s">`, that
    the state machine's transcript keeps. `first_token` (the main speaker's, or None) goes
    before the first word. Raises ScriptError for a word the tokenizer gives no token for."""
    entries: list[Entry] = []

    def add_words(segment: str) -> None:
        nonlocal first_token
        for word in normalized(segment.replace("–", "")).split():
            tokens = list(encode(word))
            if not tokens:
                raise ScriptError(f"the tokenizer gives no token for {word!r}")
            if first_token is not None:
                tokens.insert(0, first_token)
                first_token = None
            entries.append(Entry(tokens, word, word_padding(tokens, padding_between)))

    last = 0
    for match in SERVER_BREAK.finditer(text):
        add_words(text[last:match.start()])
        last = match.end()
        try:
            seconds = float(match.group(1))
        except ValueError:
            continue
        if seconds > 0:
            capped = seconds if max_break_seconds is None else min(seconds, max_break_seconds)
            entries.append(Entry(tokens=[], text=f"<break time=\"{seconds:.2f}s\">",
                                 padding=max(int(capped * frame_rate), 1)))
    add_words(text[last:])
    return entries
