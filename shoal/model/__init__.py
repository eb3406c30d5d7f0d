"""Llama-family models and their loaders (HF safetensors, GGUF, dummy weights)."""
