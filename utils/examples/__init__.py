"""Training examples as token ids: pretraining (packed blocks, span corruption, text-to-text pairs, mixes)
and SFT (prompt/answer ids through the chat format). Imports data, tokenization and the foundations."""
