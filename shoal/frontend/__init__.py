"""Front-end work shared by the API server and offline LLM: tokenize, detokenize, stop strings."""
