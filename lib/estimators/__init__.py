"""The estimators layer: Integrated Information Decomposition (phiid) and Louvain modularity (louvain). It
imports only the layers below it (lib.storage, lib.model)."""

__all__: list[str] = []
