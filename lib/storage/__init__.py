"""The storage layer (lowest): atomic file writes and the manifest (store), every file of a run declared once
(artifacts), resumable checkpoints (checkpoints), the notebooks' names (notebooks: NB), and small JSON indexes in the
user's cache folder of values computed from files (disk_index). It imports no other layer of lib."""

__all__: list[str] = []
