"""The demo's text tokenizer: a sentencepiece BPE model trained on `data/demo_corpus.txt`.

Ids follow Moshi's conventions: 0 `<unk>` (Moshi's end-of-padding token), 1 `<s>`, 2 `</s>`,
3 `<pad>` (Moshi's text padding, `existing_text_padding_id`). BPE reaches an exact vocabulary
of 1000 pieces on this small corpus (unigram stops near 540). Training runs in memory on one
thread, so the model's bytes depend only on the corpus and the vocabulary size.
"""

import io

import sentencepiece as spm

from .common import package_data

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def train_tokenizer(vocab_size: int) -> bytes:
    """A serialized sentencepiece model with exactly `vocab_size` pieces."""
    sentences = [line for line in package_data("demo_corpus.txt").splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **SPECIAL_IDS,
    )
    return model.getvalue()
