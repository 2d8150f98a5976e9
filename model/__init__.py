"""The toolkit's upper layers, everything that holds a model (see docs/ARCHITECTURE.md).

- `model.build`: presets, building and loading stock HF T5 / Llama models.
- `model.training`: the trainers (token-weighted losses, atomic checkpoints, ctrl+c), run identity, DPO.
- `model.inference`: loading for inference, batched generation, streaming, the inference service.
- `model.serving`: the HTTP adapter over the inference service (OpenAI API, guards, the FastAPI app).
- `model.evaluation`: C-Eval / CMMLU, bits per character, generation metrics, training-curve plots.

Every output directory loads with plain `AutoModelForSeq2SeqLM` / `AutoModelForCausalLM` and no
`trust_remote_code`. A layer imports only the layers before it in this list, and `utils/`.
"""
