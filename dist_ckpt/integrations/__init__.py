"""Integrations with training frameworks (optional extras): Lightning, Hugging Face."""
