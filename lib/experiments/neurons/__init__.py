"""MLP neuron effects on the output: direct (straight to the logits) vs indirect (through later layers).

Causal mediation / activation patching at the LAST prompt position. For neuron n of layer l and prompt p:

    a      the neuron's activation in the clean pass (the down projection's input) at the last position
    V      = W_down[:, n] * a   (activation_scale "actual"; "mean": a averaged over the prompts; "unit": a = 1)
    treatment  mode "add": residual stream after layer l, last position, += V;  mode "ablate": the neuron's
               activation at the down-projection input (site mlp_act), last position, set to a - s (s the scale:
               with "actual", 0: the neuron zeroed, on every architecture, also where the MLP output is normalised
               before the residual add, Gemma 2/3); V is then the change of the block's output it causes
    total      = logits(model with the treatment) - clean logits                       (a forward pass)
    direct     = logits_from_hidden(h_final + V) - logits_from_hidden(h_final)         (no forward pass)
               h_final is the final pre-norm hidden state. This is exact for "every later layer frozen" (their
               attention and MLP outputs patched to clean values: then h_final becomes h_final + V). The final norm
               is RECOMPUTED on h_final + V (TransformerLens-style direct logit attribution freezes the norm scale
               instead, which makes it linear in V); any final logit soft-capping is applied.
    indirect   = total - direct (exact as vectors over the vocabulary; magnitudes do not add)

Metrics per (neuron, prompt) on a target token (default: the clean top prediction; distractor default: the clean
runner-up): target logit effect (direct / indirect / total), target - distractor logit-difference effect, target
probability change, direct_ratio = |d| / (|d| + |i|) (0.5 when |total| < 1e-6), sign alignment (d * i > 0), and
over the whole vocabulary the mean / max |effect| and the top-k most affected token ids.

Fast path (total effects). The perturbation sits at the last position only, so (causal attention) every earlier
position is unchanged: the clean keys/values of the prompt minus its last token (the clean KV cache) are reused
and only the last token runs through the model, many neurons per forward (batch rows = neurons of one prompt, each
row its own injection, the clean cache expanded along the batch). Blocks up to the lowest injected layer are not
computed at all: their forward is temporarily replaced by the cached clean residual stream (when the block returns
a plain tensor; otherwise they run for the one token). Per neuron that is one token through the remaining layers
instead of the whole prompt through all layers. Reference implementations (whole-prompt forwards, explicit frozen
runs) are here too, for the tests, the benchmark and the notebook's live check table.

Artifacts (notebook 06): neuron_effects.csv (one row per neuron x prompt), neuron_summaries.json (one entry per
neuron, id "L{layer}/N{neuron}"), layer_summary.csv. Sharding (shard "i/n") splits the neuron set round-robin;
each shard checkpoints per batch (lib.storage.checkpoints: a checkpoint of other settings is refused, naming what differs)
and writes its shard files (lib.storage.artifacts: neuron_effects, neuron_shard_info); a run with shard "" merges them.
Modules: selection (neuron sets, prompts), effects (clean pass, total / direct / reference computations, metrics),
summaries (per neuron, per layer, trend), pipeline (setup, resumable run, shards, artifacts, live check).
"""
from lib.experiments.neurons.effects import (CLASSES, TOTAL_EPS, CleanPass, classify, clean_pass, direct_logits, direct_ratio,
                                 frozen_logits, neuron_directions, neuron_scales, total_logits_full,
                                 total_logits_incremental)
from lib.experiments.neurons.pipeline import (NeuronResult, NeuronSetup, compute_batch, compute_effects, prepare,
                                  read_effects_csv, run, verify)
from lib.experiments.neurons.selection import (MODES, SCALES, SELECTORS, Neuron, PromptSet, check_mlp_site, load_prompts,
                                   read_neuron_file, select_neurons, validate_neurons)
from lib.experiments.neurons.summaries import layer_summary, layer_trend, summaries_frame, summarize_neurons, top_neurons
from lib.storage.checkpoints import parse_shard

__all__ = ["CLASSES", "TOTAL_EPS", "CleanPass", "classify", "clean_pass", "direct_logits", "direct_ratio",
           "frozen_logits", "neuron_directions", "neuron_scales", "total_logits_full", "total_logits_incremental",
           "NeuronResult", "NeuronSetup", "compute_batch", "compute_effects", "prepare", "read_effects_csv", "run",
           "verify", "MODES", "SCALES", "SELECTORS", "Neuron", "PromptSet", "check_mlp_site", "load_prompts",
           "read_neuron_file", "select_neurons", "validate_neurons", "layer_summary", "layer_trend",
           "summaries_frame", "summarize_neurons", "top_neurons"]
