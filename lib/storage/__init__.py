"""The storage layer (lowest): atomic file writes and the manifest (store), every file of a run declared once
(artifacts), resumable checkpoints (checkpoints), the notebooks' names (notebooks: NB). It imports no other layer
of lib."""

__all__: list[str] = []
