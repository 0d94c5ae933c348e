"""The model layer: the architecture table (architectures), model loading (loading), the bundled models' GGUF
conversion (bundled), weights checksums (checksums), the per-head hook (heads), forward hooks (hooks), the prompt
sets (prompts). It imports only lib.storage."""

__all__: list[str] = []
