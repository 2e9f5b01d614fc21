"""Integrations with other libraries, each imported on demand (the libraries are optional):
`flashtron.integrations.transformers` registers flashtron as a Hugging Face attention implementation."""
