"""Evaluation: C-Eval / CMMLU multiple choice, bits per character, generation metrics (BLEU-4, ROUGE-L,
triples), result tables and training-curve plots. Imports inference, training records and `utils`."""
