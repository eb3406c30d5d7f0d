"""The ApiServer_i process: the ASGI app, the OpenAI routes and schema, SSE, admission control
and metrics. Never imports torch."""
