"""Calibration data: built-in text, token and text files, Hugging Face datasets, chat templates, the manifest."""
