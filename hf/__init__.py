"""Hugging Face GPT-2 checkpoints in and out of jaxlab; the command is tools/hf_convert.py."""
