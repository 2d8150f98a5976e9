"""Training: the trainers (token-weighted losses, atomic checkpoints, ctrl+c and resume, progress line),
run identity (`run.json`) and DPO with LoRA. Imports `model.build` and `utils`."""
