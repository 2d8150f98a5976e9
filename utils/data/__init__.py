"""Data: sources (one reader per file format), Wikipedia dumps, text cleaning, dedup, the corpus stage,
conversations and preference pairs. Imports only `utils` foundations."""
