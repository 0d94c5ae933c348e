"""The model layer: the architecture table and model loading (loading), the per-head hook (heads), forward hooks
(hooks), the prompt sets (prompts). It imports only lib.storage."""

__all__: list[str] = []
