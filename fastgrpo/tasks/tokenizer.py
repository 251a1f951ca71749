"""The small word-level tokenizers of the built-in tasks, built offline with ``tokenizers``
(``fastgrpo.tasks.arithmetic.build_tokenizer`` builds the arithmetic task's), and
:func:`encode_prompt`.

Pre-tokenization splits text into ``###``, words, single digits, single symbols, newlines and
runs of spaces; a word, digit or symbol keeps the one space before it (`` Step``, `` 1``,
``2``), so decoding is plain concatenation and round-trips exactly.  Numbers are spelled one
digit per token.  Special tokens: ``<s>`` (bos), ``</s>`` (eos), ``<pad>``, ``<unk>``,
``<|user|>``, ``<|assistant|>``.  The chat template renders::

    <s><|user|>
    {prompt}
    <|assistant|>
    {completion}</s>
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

__all__ = ["word_level_tokenizer", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "encode_prompt"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}<|user|>\n{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_SPLIT = Regex(r" ?###| ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]|\n| +")


def _pre_tokenizer():
    return pre_tokenizers.Split(_SPLIT, behavior="isolated")


def word_level_tokenizer(texts):
    """A ``PreTrainedTokenizerFast`` whose word-level vocabulary covers ``texts`` (ids in order
    of first appearance, after the special tokens); the chat template above."""
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in vocab:
                vocab[piece] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>"],
        padding_side="left", model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a user prompt ready for generation (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def __getattr__(name: str):
    """Deprecated (one release): ``fastgrpo.tasks.tokenizer.build_tokenizer`` moved to
    ``fastgrpo.tasks.arithmetic.build_tokenizer`` (the arithmetic task's vocabulary).  Resolved
    when first asked for, so this toolkit module never imports a task."""
    if name == "build_tokenizer":
        import importlib
        import warnings
        warnings.warn("fastgrpo.tasks.tokenizer.build_tokenizer moved to "
                      "fastgrpo.tasks.arithmetic.build_tokenizer", DeprecationWarning, stacklevel=2)
        return importlib.import_module("fastgrpo.tasks.arithmetic.tokenizer").build_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
