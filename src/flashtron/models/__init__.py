"""Models built from flashtron.nn: a GPT with GPT-2 and Llama-style presets."""

from flashtron.models.gpt import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS"]
