"""Evaluation, the top layer: imports inference, training records and `utils`.

- `benchmarks`: C-Eval / CMMLU multiple choice (data, prompts, letter logits, accuracy, shots that ran).
- `metrics`: bits per character (on OpenCC-converted text), BLEU-4 / ROUGE-L of replies, triple scores.
- `report`: the results as markdown tables.
- `plots`: training curves of a run's `trainer_state.json`.
"""
