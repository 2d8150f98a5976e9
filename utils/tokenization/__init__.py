"""Tokenizers (training, extension, scoring) and the chat format every stage renders conversations with.
Imports `utils.data` (to read corpora) and the foundations."""
