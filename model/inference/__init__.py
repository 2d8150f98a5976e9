"""Inference: loading a model for inference, batched generation, per-request streaming and the inference
service that chat.py and serve.py share. Imports `model.build` and `utils`."""
