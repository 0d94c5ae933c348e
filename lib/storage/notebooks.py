"""The notebooks' names, declared once: `NB.ABLATION` is "05_ablation".

A notebook's name is its file (notebooks/<name>.ipynb) and also names, in a run, its params section, its manifest
section, its executed copy and report page (outputs/<run>/<name>.ipynb, html/<name>.html) and the producer of its
artifacts. The rest of lib refers to a notebook through these constants (or through an artifact's `producer`), never
by spelling the name, so renaming or adding a notebook is one line here (tests/test_notebook_names.py counts the
modules that spell each name). The storage layer holds them because the artifact registry, the lowest user, needs
them; a stage's other facts (parents, device, cost, rules, claims) are declared with it in lib.pipeline.stages.
"""
from __future__ import annotations

__all__ = ["NB"]


class NB:
    """Every notebook of notebooks/, by role. 00 and 12 are not pipeline stages (the explorer of a finished run, the
    comparison of several runs); 01-11 are."""
    EXPLORE = "00_explore"
    EXTRACT = "01_extract_activations"
    PHIID = "02_phiid"
    DIAGNOSTICS = "03_phiid_diagnostics"
    RANKING = "04_ranking_variants"
    ABLATION = "05_ablation"
    NEURONS = "06_neuron_effects"
    INTERFERENCE = "07_qkov_interference"
    TOPOLOGY = "08_topology"
    BEHAVIOUR = "09_task_behaviour"
    FINETUNE = "10_head_finetuning"
    LOCAL = "11_local_synergy"
    COMPARE = "12_compare_models"

    def __init__(self):
        raise TypeError("NB is a namespace of notebook names (NB.ABLATION); it has no instances")
