"""The toolkit's lower layers, below everything that holds a model (see docs/ARCHITECTURE.md).

- `utils/*.py`: foundations every layer uses: errors (`UserError`, `run_main`), atomic files (`io`),
  recipes and flags (`config`), logging.
- `utils.data`: reading sources (one reader per file format), Wikipedia extraction, text cleaning,
  near-duplicate removal, the corpus stage, conversations and preference pairs.
- `utils.tokenization`: tokenizer training, extension and scoring, and the one chat format.
- `utils.examples`: token ids for training: packed / span-corruption pretraining examples, SFT examples.

Nothing here imports `model/` or a stage script.
"""
