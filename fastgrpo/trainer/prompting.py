"""What a run asks the model for: the completion layout (``--layout``) and the prompt around
the data's own (``--system-prompt`` / ``--system-prompt-file``, conversational rows).

Layouts: ``r1vl`` (``### Step k:`` ... ``### The final answer is:``; R1-VL's multimodal form
for a vision-language model), ``tags`` (``<think>`` steps ``</think><answer>...</answer>``),
``free`` (no sections: ``fastgrpo.rewards.free``).  Without ``--layout``: a preset's layout,
else ``r1vl``, as before.  With an explicit ``--layout`` and no system prompt, a model with a
chat template is told the layout by :data:`LAYOUT_INSTRUCTIONS` (the words the reward reads).

A prompt is a string (the user turn) or a list of ``{"role", "content"}`` messages.  A system
prompt is put first, unless the row's messages begin with their own.  With a chat template
the messages go through it (ending with the assistant header); without one, a string prompt
is encoded as before (``tasks.tokenizer.encode_prompt``; a system prompt is put before it,
separated by a blank line) and a conversational prompt is an error.
"""

from __future__ import annotations

from pathlib import Path

from fastgrpo.rewards import R1VL_LAYOUT, R1VL_MULTIMODAL_LAYOUT, TAG_LAYOUT
from fastgrpo.rewards.free import FREE
from fastgrpo.tasks.data import DataError
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer.errors import ConfigError

__all__ = ["LAYOUT_NAMES", "LAYOUT_INSTRUCTIONS", "resolve_layout", "system_prompt",
           "make_encoder", "chat_messages"]

LAYOUT_NAMES = ("r1vl", "tags", "free")
LAYOUT_INSTRUCTIONS = {
    "r1vl": ("Answer in this format:\n### Rationales: <your plan>\n### Step 1: <first step>\n"
             "### Step 2: <next step>\n### The final answer is: <answer>"),
    "tags": ("Think step by step inside <think> </think>, one step per line written as "
             "'Step 1: ...', then give only the final answer inside <answer> </answer>."),
    "free": "Solve the problem step by step, then give the final answer on its own line as "
            "'#### <answer>'.",
}


def resolve_layout(name: str, preset=None, vision: bool = False):
    """The reward layout: a ``Layout``, or ``FREE`` (the string ``"free"``); ``name`` is
    ``--layout`` ("" = the preset's, else R1-VL's)."""
    if not name:
        name = "tags" if preset is not None and preset.layout == "tag" else "r1vl"
    if name == "tags":
        return TAG_LAYOUT
    if name == "free":
        return FREE
    return R1VL_MULTIMODAL_LAYOUT if vision else R1VL_LAYOUT


def system_prompt(cfg, preset=None) -> str:
    """``--system-prompt``, the file ``--system-prompt-file`` names, the explicit ``--layout``'s
    instruction, or the preset's; "" for none."""
    if cfg.system_prompt_file:
        p = Path(cfg.system_prompt_file)
        try:
            return p.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"invalid --system-prompt-file {cfg.system_prompt_file!r}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
    if cfg.system_prompt:
        return cfg.system_prompt
    if cfg.layout:
        return LAYOUT_INSTRUCTIONS[cfg.layout]
    if preset is not None and preset.use_chat_template:
        return preset.system_prompt
    return ""


def chat_messages(prompt, system: str = "") -> list[dict]:
    """The prompt as chat messages, ``system`` first unless the messages have their own."""
    msgs = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def make_encoder(system: str = ""):
    """``encode(tokenizer, prompt) -> ids`` ready for generation (see the module doc)."""

    def encode(tokenizer, prompt) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(chat_messages(prompt, system),
                                                 add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, list):
            raise DataError("conversational prompts (a list of messages) need a tokenizer with a "
                            "chat template; this model's tokenizer has none: give string prompts")
        return encode_prompt(tokenizer, f"{system}\n\n{prompt}" if system else prompt)

    return encode
