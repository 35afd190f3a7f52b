"""Generative models: the byte-level tokenizer, the tiny GPT's training recipe."""
