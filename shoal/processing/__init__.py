"""Tokenizer-side work shared by the API server and the offline `LLM`: tokenizers, chat
templates, input validation, detokenization and output assembly. Never imports torch."""
