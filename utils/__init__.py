"""Shared core of the toolkit: configuration, logging, data, text and training helpers.

Stage scripts at the repository root (`prepare_data.py`, `train_tokenizer.py`, ...) import from here;
nothing in `utils/` imports a stage script.
"""
