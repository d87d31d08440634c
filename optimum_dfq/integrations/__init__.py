"""Integrations with other libraries of the Hugging Face ecosystem."""
