"""Integrations with training frameworks, each an optional extra.

Import the module you need (``dist_ckpt.integrations.lightning``); this package itself
imports nothing, so one framework being absent never breaks another.
"""
