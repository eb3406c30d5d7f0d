"""The launcher process and every command line: `shoal serve` (launcher.py), `generate` and
`chat`, `bench`; the offline `LLM`."""
