"""Structured outputs: grammar specs (`params`), their checks in the API server
(`requests`, `schema_check`, `tool_choice`) and the engine's compile thread and token masks
(`manager`, `backend`). Only `backend` imports xgrammar (and so torch)."""
