"""Kyutai TTS without PyTorch: the cross-attention layers (cached keys and values, quantized),
the config's checks, the script and state machine's rules, the speaker condition's checks and
a generation fed its words as they arrive. Parity with PyTorch: tests/test_tts_parity.py."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import DATA, random_model

from moshi_mlx import models
from moshi_mlx.models import tts_script as ts
from moshi_mlx.models.transformer import linear_rows
from moshi_mlx.models.tts import TtsGen, TtsSettings, VoiceError, speaker_condition
from moshi_mlx.utils.sampling import Sampler

IDS = ts.TokenIds(card=101)


def tts_dict(**changes) -> dict:
    return json.loads((DATA / "small_tts.json").read_text()) | changes


@pytest.fixture(scope="module")
def model():
    return random_model(models.LmConfig.from_config_dict(tts_dict(context=40)), seed=2)


def condition(model, voices=1, frames=6, seed=0):
    rng = np.random.default_rng(seed)
    wavs = [mx.array(rng.standard_normal((1, 512, frames)), mx.float32) for _ in range(voices)]
    speakers = speaker_condition(wavs, TtsSettings.of(model.cfg).max_speakers)
    return model.condition_provider.condition(
        {"control": "ok", "cfg": "2.0", "speaker_wavs": speakers})


def test_cross_attention_step_by_step_equals_full_sequence(model):
    """The keys and values computed once serve every step: 12 steps through the cache give the
    logits of the 12 steps at once; another speaker changes them."""
    ct = condition(model)
    cross = model.cross_keys_values(ct)
    rng = np.random.default_rng(1)
    text = mx.array(rng.integers(0, 100, (1, 12)), mx.int32)
    audio = mx.array(rng.integers(0, 64, (1, 8, 12)), mx.int32)
    _, full = model(text, audio, condition=ct, cross=cross)
    cache = model.make_cache()
    steps = [model(text[:, t:t + 1], audio[:, :, t:t + 1], cache=cache, condition=ct,
                   cross=cross)[1] for t in range(12)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full),
                               rtol=1e-4, atol=1e-4)
    other = condition(model, seed=5)
    _, changed = model(text, audio, condition=other, cross=model.cross_keys_values(other))
    assert np.abs(np.array(changed) - np.array(full)).max() > 1e-2
    with pytest.raises(ValueError, match="cross_keys_values"):
        model(text, audio, condition=ct)


@pytest.mark.parametrize("bits, group_size", [(8, 64), (4, 32)])
def test_quantized_cross_attention_rows_are_the_layers_rows(bits, group_size):
    linear = nn.Linear(64, 192, bias=False)
    q = nn.QuantizedLinear.from_linear(linear, group_size=group_size, bits=bits)
    x = mx.random.normal((2, 3, 64))
    full = q(x)
    for start, stop in ((0, 64), (64, 192)):
        np.testing.assert_array_equal(np.array(linear_rows(q, x, start, stop)),
                                      np.array(full[..., start:stop]))


def test_quantize_covers_cross_attention_but_not_conditioners():
    m = models.Lm(models.LmConfig.from_config_dict(tts_dict()))
    models.quantize(m, bits=8, group_size=64)
    layer = m.transformer.layers[0]
    assert isinstance(layer.cross_attention.in_proj, nn.QuantizedLinear)
    assert isinstance(layer.cross_attention.out_proj, nn.QuantizedLinear)
    speaker = m.condition_provider.conditioners["speaker_wavs"]
    assert isinstance(speaker.output_proj, nn.Linear)


def test_tts_config_is_read():
    cfg = models.LmConfig.from_config_dict(tts_dict())
    s = TtsSettings.of(cfg)
    assert (s.delay_steps, s.second_stream_ahead, s.max_speakers, s.multi_speaker) == \
        (16, 2, 5, True)
    assert s.cfg_values[0] == "1.0" and cfg.cross_conditioners == ["speaker_wavs"]
    assert cfg.sum_conditioners == ["control", "cfg"]
    three = models.LmConfig.from_config_dict(tts_dict(tts_config={"audio_delay": 0.4,
                                                                  "max_speakers": 3}))
    assert TtsSettings.of(three).max_speakers == 3 and TtsSettings.of(three).delay_steps == 5


@pytest.mark.parametrize("change, field", [
    ({"fuser": {"sum": ["control", "cfg", "speaker_wavs"]}}, "cross_attention"),
    ({"fuser": {"sum": ["speaker_wavs"], "cross": ["cfg", "control"]}}, "fuser"),
    ({"tts_config": {"audio_delay": "1s"}}, "tts_config"),
    ({"tts_config": {"second_stream_ahead": 2}, "demux_second_stream": False}, "tts_config"),
    ({"text_card_out": 0}, "text_card_out"),
    ({"tts_config": {"audio_delay": 1.28, "multistream": True}}, "tts_config"),
])
def test_bad_tts_configs_name_the_field(change, field):
    with pytest.raises(models.ConfigError, match=f"'{field}'"):
        models.LmConfig.from_config_dict(tts_dict(**change))


def encode(word):
    return [4 + len(word)] * (1 + len(word) // 4)


def test_script_words_turns_breaks_and_padding():
    entries = ts.script_to_entries(encode, IDS, 12.5, [
        "Hi: (you) there<break time=\"1.5s\"/>again", "", "Bye’s now"], padding_between=1)
    # the third turn is the main speaker's again, who spoke last: no speaker token
    assert [(e.text, e.tokens, e.padding) for e in entries] == [
        ("Hi", [IDS.main, 6], 2), ("you", [7], 1), ("there", [9, 9], 2),
        ("", [], 19), ("again", [9, 9], 2), ("Bye's", [9, 9], 2), ("now", [7], 1)]
    single = ts.script_to_entries(encode, IDS, 12.5, ["a b", "c"], multi_speaker=False)
    assert [e.tokens for e in single] == [[5], [5], [5]]
    two = ts.script_to_entries(encode, IDS, 12.5, ["a b", "c"])
    assert [e.tokens for e in two] == [[IDS.main, 5], [5], [IDS.other, 5]]


@pytest.mark.parametrize("bad", ['<break time="soon"/>', '<break time="1.5"/>',
                                 '<break time="-1s"/>'])
def test_break_with_a_bad_time_is_one_clear_error(bad):
    with pytest.raises(ts.ScriptError, match="break needs a time in seconds"):
        ts.script_to_entries(encode, IDS, 12.5, [f"hello {bad} world"])


def test_a_break_is_capped_at_max_break_seconds():
    """As Kyutai's server caps a client's breaks (10 s there), `max_break_seconds` does."""
    capped = ts.script_to_entries(encode, IDS, 12.5, ['a <break time="600s"/> b'],
                                  max_break_seconds=10)
    assert [e.padding for e in capped if not e.tokens] == [125]
    short = ts.script_to_entries(encode, IDS, 12.5, ['a <break time="0.4s"/> b'],
                                 max_break_seconds=10)
    assert [e.padding for e in short if not e.tokens] == [5]


def test_a_word_without_tokens_is_an_error():
    with pytest.raises(ts.ScriptError, match="no token for 'x'"):
        ts.script_to_entries(lambda w: [] if w == "x" else [5], IDS, 12.5, ["a x"])


def test_server_text_as_kyutais_server_reads_it():
    """moshi-server's tts_preprocess: en dashes dropped; only a whole break tag is a break, of
    max(floor(min(s, 10) * 12.5), 1) steps, with a text of its own; a tag it does not take is
    words, one whose time is no number or 0 s is dropped; the first word gets `first_token`."""
    entries = ts.server_text_to_entries(
        encode, IDS, 12.5, 'Hi – there<break time="0.3s"/>a <break time="soon"/> '
        '<break time="1.2.3s"/><break time="0s"/><break time="20s"/>(b): c–d',
        first_token=IDS.main, padding_between=1, max_break_seconds=10)
    assert [(e.text, e.tokens, e.padding) for e in entries] == [
        ("Hi", [IDS.main, 6], 2), ("there", [9, 9], 2), ('<break time="0.30s">', [], 3),
        ("a", [5], 1), ("<break", [10, 10], 2), ('time="soon"/>', [17] * 4, 4),
        ('<break time="20.00s">', [], 125), ("b", [5], 1), ("cd", [6], 1)]
    assert ts.server_text_to_entries(encode, IDS, 12.5, " – ") == []


def test_a_break_with_a_text_is_in_the_transcript():
    """A break is in the transcript when it has a text (Kyutai's server's), not otherwise
    (script_to_entries', as PyTorch moshi's)."""
    machine = ts.StateMachine(IDS, max_padding=1, initial_padding=0)
    state = machine.new_state([ts.Entry([7], "a", 1), ts.Entry([], "", 1),
                               ts.Entry([], "<break>", 1), ts.Entry([8], "b")])
    for t in range(12):
        machine.process(t, state, IDS.new_word)
    assert [word for word, _ in state.transcript] == ["a", "<break>", "b"]
    assert len(state.consumption_times) == 4


def test_state_machine_pads_forces_words_and_ends():
    """Initial padding 2, then the model's pad choices until `max_padding` forces the word; a
    word's tokens are fed one per step; asking past the last word ends (end_step)."""
    machine = ts.StateMachine(IDS, second_stream_ahead=0, max_padding=3, initial_padding=2)
    state = machine.new_state([ts.Entry([7, 8], "ab"), ts.Entry([9], "c")])
    fed = [machine.process(t, state, IDS.pad if t < 6 else IDS.new_word)[0] for t in range(12)]
    # steps 0-1 forced pad; 2 asks... pad (model), remaining 0 at step 2 -> word forced
    assert fed[:3] == [IDS.pad, IDS.pad, IDS.new_word]
    assert fed[3:5] == [7, 8]
    assert state.transcript == [("ab", 2), ("c", 6)]
    assert state.end_step == 8 and fed[8] == IDS.pad


def test_second_stream_carries_the_lookahead_word():
    machine = ts.StateMachine(IDS, second_stream_ahead=1, max_padding=8, initial_padding=0)
    state = machine.new_state([ts.Entry([7], "a"), ts.Entry([8, 9], "b")])
    fed, _ = machine.process(0, state, IDS.new_word)
    assert fed == (IDS.new_word + 1) * IDS.card + 7  # "new word" signal, the word's token
    fed, _ = machine.process(1, state, IDS.pad)
    assert fed == (8 + 1) * IDS.card + IDS.pad  # the next word, ahead, on the second stream


def test_open_state_waits_for_words_instead_of_ending():
    machine = ts.StateMachine(IDS, max_padding=1, initial_padding=0)
    state = machine.new_state([])
    state.closed = False
    assert [machine.process(t, state, IDS.new_word)[0] for t in range(3)] == [IDS.pad] * 3
    assert state.end_step is None
    state.entries.append(ts.Entry([7], "a"))
    assert machine.process(3, state, IDS.new_word)[0] == IDS.new_word
    state.closed = True
    machine.process(4, state, IDS.pad)
    machine.process(5, state, IDS.new_word)
    assert state.end_step == 5


def test_speaker_condition_packs_slots_and_rejects_bad_voices():
    v = mx.ones((1, 512, 4))
    tensor, mask = speaker_condition([v, 2 * v], max_speakers=3)
    assert tensor.shape == (1, 12, 512) and mask.tolist() == [[True] * 8 + [False] * 4]
    assert tensor[0, 4, 0].item() == 2 and tensor[0, 8, 0].item() == 0
    with pytest.raises(VoiceError, match="shape"):
        speaker_condition([v, mx.ones((1, 512, 5))])
    with pytest.raises(VoiceError, match="shape"):
        speaker_condition([mx.ones((512, 4))])
    with pytest.raises(VoiceError, match="at most 2"):
        speaker_condition([v] * 3, max_speakers=2)
    with pytest.raises(VoiceError, match="no voice"):
        speaker_condition([])


def run(model, machine, entries, split_at=None, steps=60):
    greedy = Sampler(temp=0.0)
    gen = TtsGen(model, machine, condition(model), delay_steps=4, text_sampler=greedy,
                 audio_sampler=greedy)
    first = entries if split_at is None else entries[:split_at]
    gen.push_words(first)
    out = []
    while not gen.done and gen.step_idx < steps:
        if split_at is not None and gen.step_idx == 1:
            gen.push_words(entries[split_at:])
        if gen.step_idx == 1:
            gen.end()
        s = gen.step()
        out.append((s.sampled, s.fed, None if s.frame is None else s.frame.tolist(), s.words))
    return out, gen


@pytest.mark.slow  # 120 steps, twice
def test_words_pushed_while_speaking_give_the_same_speech(model):
    """Words that arrive before they are needed (the first word starts at step 2, with its
    lookahead word) change nothing; after end() the generation
    finishes `delay_steps + final_padding` steps after the last word; frames come from step
    max_delay, the text first."""
    machine = ts.StateMachine(ts.TokenIds(model.cfg.text_card + 1), 2, 4, 2)
    entries = ts.script_to_entries(encode, machine.token_ids, 12.5,
                                   ["one two three four five six"])
    whole, gen = run(model, machine, entries)
    pieces, _ = run(model, machine, entries, split_at=2)
    assert whole == pieces
    assert gen.done and gen.step_idx == gen.end_step + 4 + 4
    assert [s[2] is None for s in whole[:3]] == [True, True, False]
    assert all(len(s[2]) == 9 for s in whole[2:])
    with pytest.raises(ValueError, match="end"):
        gen.push_words(entries)


def test_n_q_samples_fewer_codebooks_and_feeds_nothing_for_the_others(model):
    machine = ts.StateMachine(ts.TokenIds(model.cfg.text_card + 1), 2, 4, 2)
    gen = TtsGen(model, machine, condition(model), delay_steps=2, n_q=3,
                 text_sampler=Sampler(temp=0.0), audio_sampler=Sampler(temp=0.0))
    gen.push_words(ts.script_to_entries(encode, machine.token_ids, 12.5, ["a b c"]))
    frames = [f for f in (gen.step().frame for _ in range(12)) if f is not None]
    assert all(f.shape == (4,) for f in frames)
    assert all(-1 <= v < 64 for f in frames for v in f.tolist()[1:])
    with pytest.raises(ValueError, match="n_q must be from 1 to the model's 8"):
        TtsGen(model, machine, condition(model), delay_steps=2, n_q=9)


def test_voices_for_a_model_without_speaker_embeddings_are_refused():
    """Kyutai's public-data TTS has no speaker conditioner (its voice is an audio prefix)."""
    from moshi_mlx.engine.tts import TtsStream

    d = tts_dict(cross_attention=False, fuser={"sum": ["control", "cfg"]})
    del d["conditioners"]["speaker_wavs"]
    plain = random_model(models.LmConfig.from_config_dict(d))
    assert not TtsSettings.of(plain.cfg).multi_speaker
    with pytest.raises(VoiceError, match="no speaker embeddings"):
        TtsStream(plain, None, "unused", [mx.ones((1, 512, 4))],
                  (Sampler(temp=0.0), Sampler(temp=0.0)))


def test_the_unconditioned_row_drops_every_condition(model):
    """Guidance's second row: the LUTs' learnt paddings, the speaker slots all learnt padding
    (with their positions); a cfg-distilled model refuses guidance."""
    from moshi_mlx.models.tts import tts_condition

    provider = model.condition_provider
    speakers = speaker_condition([mx.ones((1, 512, 3))], 2)
    values = {"control": "ok", "speaker_wavs": speakers}
    null = provider.unconditioned(values)
    padding = np.array(provider.conditioners["speaker_wavs"].learnt_padding)[0, 0]
    t = np.arange(6)[:, None] / 10000 ** (np.arange(128) / 127)  # Moshi's sinusoidal positions
    positions = np.concatenate([np.cos(t), np.sin(t)], axis=1)
    np.testing.assert_allclose(np.array(null.cross)[0], padding + positions, atol=1e-5)
    lut = [provider.conditioners[n].learnt_padding[0, 0] for n in ("control", "cfg")]
    np.testing.assert_allclose(np.array(null.tensor)[0], np.array(lut[0] + lut[1]), atol=1e-6)
    with pytest.raises(ValueError, match="cfg-distilled"):
        tts_condition(provider, values, 2.0)


def test_tts_gen_checks_the_rows_and_the_prefix(model):
    machine = ts.StateMachine(ts.TokenIds(model.cfg.text_card + 1))
    with pytest.raises(ValueError, match="guidance 2.0 takes 2"):
        TtsGen(model, machine, condition(model), delay_steps=2, cfg_coef=2.0)
    with pytest.raises(ValueError, match=r"a prefix is Mimi codes \[8 codebooks"):
        TtsGen(model, machine, condition(model), delay_steps=2, prefix=mx.zeros((4, 10)))
