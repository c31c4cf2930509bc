"""Integrations with VLM codebases (LLaVA, transformers)."""
