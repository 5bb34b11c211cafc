"""Turning text and chat messages into token ids, the same way for training and serving."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The model's own chat template rendered to text (ChatML for SmolLM2)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat conversation, ending with the assistant turn's opening."""
    return text_ids(tokenizer, chat_text(tokenizer, messages, add_generation_prompt=True))


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of raw text, with no special tokens added (the template already has its own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
