"""Model architectures, presets and generation helpers (filled by the pretraining stage).

Models are stock Hugging Face classes (T5, Llama) built from configs, so every output directory loads
with plain `AutoModelForSeq2SeqLM` / `AutoModelForCausalLM` and no `trust_remote_code`.
"""
