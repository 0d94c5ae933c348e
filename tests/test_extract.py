"""Extraction: shapes, values, batched vs one-at-a-time generation, resume after a kill, bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib.experiments.extract import compare_batched, extract_activations, extract_to_file, generate_batch, encode_prompts
from lib.model.heads import HeadHooks
from lib.model.prompts import select_prompts
from lib.storage.store import load_npz
from tests.conftest import cached_model


def test_shapes_values_and_steps(tiny_arch):
    name, model, tokenizer, arch = tiny_arch
    prompts = select_prompts(6)
    run = extract_activations(model, tokenizer, arch, prompts, n_tokens=7, batch_size=4, progress=False)
    assert run.activations.shape == (6, arch.total_heads, 7) and run.activations.dtype == np.float32
    assert run.tokens.shape == (6, 7)
    assert np.isfinite(run.activations).all() and (run.activations > 0).all()
    # step t is the forward pass that produced token t: recompute step 3 of prompt 0 with a plain forward
    ids = encode_prompts(tokenizer, [prompts[0].text], False)[0] + list(run.tokens[0, :3])
    with torch.no_grad(), HeadHooks(arch, record=True) as hooks:
        logits = model(torch.tensor([ids])).logits
        norms = hooks.pop_norms()[0].numpy()
    assert logits[0, -1].argmax().item() == run.tokens[0, 3]
    np.testing.assert_allclose(run.activations[0, :, 3], norms, rtol=1e-4, atol=1e-5)


def test_exactly_n_tokens_even_past_eos(smollm2):
    model, tokenizer, arch = smollm2
    # without its chat template SmolLM2-Instruct emits <|im_end|> within a few tokens; generation must go on
    tokens, norms = generate_batch(model, arch, encode_prompts(tokenizer, ["Correct the error: He go to school."], False),
                                   40, tokenizer.pad_token_id)
    assert tokens.shape == (1, 40) and norms.shape == (1, arch.total_heads, 40)
    assert (tokens[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")).any()


def test_batched_equals_one_at_a_time_on_smollm2(smollm2):
    model, tokenizer, arch = smollm2
    prompts = select_prompts(6)
    batched = extract_activations(model, tokenizer, arch, prompts, n_tokens=16, batch_size=6, chat_template=True,
                                  progress=False)
    single = extract_activations(model, tokenizer, arch, prompts, n_tokens=16, batch_size=1, chat_template=True,
                                 progress=False)
    rows = compare_batched(batched, single)
    same = [r for r in rows if r["same_tokens"]]
    assert len(same) >= 5                                  # padding noise may flip a near-tie at most rarely
    for r in same:
        i = [p.prompt_id for p in prompts].index(r["prompt_id"])
        np.testing.assert_allclose(batched.activations[i], single.activations[i], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_tokens=0), "n_tokens must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(prompts=[]), "empty prompt list"),
])
def test_bad_input(kwargs, message):
    model, tokenizer, arch = cached_model("random:llama")
    args = dict(prompts=select_prompts(2), n_tokens=2, batch_size=2) | kwargs
    with pytest.raises(ValueError, match=message):
        extract_activations(model, tokenizer, arch, args.pop("prompts"), progress=False, **args)


def test_bad_input_leaves_no_artifact(tmp_path):
    with pytest.raises(ValueError, match="n_tokens"):
        extract_to_file(tmp_path, "random:llama", n_prompts=2, n_tokens=-1)
    with pytest.raises(ValueError, match="n_prompts"):
        extract_to_file(tmp_path, "random:llama", n_prompts=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow(reason="kills an extraction process with SIGKILL and reruns it")
def test_killed_extraction_resumes(tmp_path):
    """Kill an extraction after its first batch; the rerun reuses that batch and ends identical to a clean run."""
    code = ("import sys, lib.experiments.extract as e\n"
            "orig = e.generate_batch\ncalls = []\n"
            "def once(*a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 2: import os; os._exit(9)\n"
            "    return orig(*a, **k)\n"
            "e.generate_batch = once\n"
            "e.extract_to_file(sys.argv[1], 'random:llama', n_prompts=4, n_tokens=5, batch_size=2, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not (tmp_path / "a" / "activations.npz").exists()
    assert len(list((tmp_path / "a" / ".extract_checkpoints").rglob("batch-*.npz"))) == 1
    calls = []
    import lib.experiments.extract as e
    original = e.generate_batch
    try:
        e.generate_batch = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        extract_to_file(tmp_path / "a", "random:llama", n_prompts=4, n_tokens=5, batch_size=2, progress=False)
    finally:
        e.generate_batch = original
    assert len(calls) == 1                                  # only the unfinished batch was generated again
    extract_to_file(tmp_path / "b", "random:llama", n_prompts=4, n_tokens=5, batch_size=2, progress=False)
    resumed, clean = load_npz(tmp_path / "a" / "activations.npz"), load_npz(tmp_path / "b" / "activations.npz")
    np.testing.assert_array_equal(resumed["tokens"], clean["tokens"])
    np.testing.assert_allclose(resumed["activations"], clean["activations"], rtol=1e-6)
    assert not (tmp_path / "a" / ".extract_checkpoints").exists()


def test_identical_extraction_is_reused_and_changed_one_is_not(tmp_path, monkeypatch):
    import lib.experiments.extract as e
    first, *_ = extract_to_file(tmp_path, "random:llama", n_prompts=2, n_tokens=3, batch_size=2, progress=False)
    monkeypatch.setattr(e, "generate_batch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    again, *_ = extract_to_file(tmp_path, "random:llama", n_prompts=2, n_tokens=3, batch_size=2, progress=False)
    np.testing.assert_array_equal(first.activations, again.activations)
    with pytest.raises(AssertionError, match="regenerated"):      # a different setting is a new extraction
        extract_to_file(tmp_path, "random:llama", n_prompts=2, n_tokens=4, batch_size=2, progress=False)


def test_generation_uses_the_cache_api_without_warnings(tiny_arch):
    """The KV cache goes through transformers' current `cache=` API: no deprecation (Future)Warning, and the tokens
    equal greedy decoding without any cache (the full sequence re-run at every step)."""
    import warnings
    _, model, tokenizer, arch = tiny_arch
    prompt_ids = encode_prompts(tokenizer, ["The cat sat on the", "Two plus"], False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens, norms = generate_batch(model, arch, prompt_ids, 4, tokenizer.pad_token_id)
    assert norms.shape == (2, arch.total_heads, 4)
    for row, ids in enumerate(prompt_ids):
        seq = list(ids)
        with torch.no_grad():
            for _ in range(4):
                seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        assert tokens[row].tolist() == seq[len(ids):]


# ----------------------------------------------------------------------------- training checkpoints (revisions)

FAKE_HUB_ID = "fake-org/tiny-checkpoints"


@pytest.fixture
def fake_checkpoint_hub(tmp_path, monkeypatch):
    """FAKE_HUB_ID with two training checkpoints, step10 and step20: two tiny llama models with different weights
    saved as ordinary HF folders; from_pretrained and snapshot_download resolve (FAKE_HUB_ID, revision) to them,
    so lib.model.loading.load_model takes its Hugging Face path (revision passed through, weights checksum of the folder)."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lib.model.loading import load_model
    folders = {}
    for seed, revision in enumerate(("step10", "step20"), start=1):
        model, tokenizer, _ = load_model("random:llama", seed=seed, device="cpu")
        folders[revision] = tmp_path / "hub" / revision
        model.save_pretrained(folders[revision])
        tokenizer.save_pretrained(folders[revision])

    def redirect(original):
        def from_pretrained(spec, *args, revision=None, **kwargs):
            if spec != FAKE_HUB_ID:
                return original(spec, *args, revision=revision, **kwargs)
            return original(folders[revision], *args, **kwargs)
        return from_pretrained

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", redirect(AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", redirect(AutoTokenizer.from_pretrained))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, local_files_only=False: str(folders[revision]))
    return folders


def test_revisions_end_to_end_extraction_phiid_and_tags(tmp_path, fake_checkpoint_hub):
    from lib.storage import artifacts
    from lib.estimators import phiid
    from lib.experiments.extract import extract_baselines, load_run
    from lib.storage.store import read_manifest
    out = tmp_path / "run"
    runs = extract_baselines(out, FAKE_HUB_ID, baseline_random_init=False, revisions=["step20", "step10"],
                             n_prompts=2, n_tokens=12, batch_size=2, chat_template=False, device="cpu",
                             progress=False)
    assert list(runs) == ["rev-step20", "rev-step10"]
    assert artifacts.tags("activations", out) == ["rev-step10", "rev-step20"]       # training order
    assert (out / "activations__rev-step10.npz").is_file() and (out / "activations__rev-step20.npz").is_file()
    early, late = load_run(out, "rev-step10").activations, load_run(out, "rev-step20").activations
    assert early.shape == late.shape and not np.allclose(early, late), "two checkpoints gave the same activations"
    sections = read_manifest(out)["sections"]
    ids = {tag: sections[f"01_extract_activations__{tag}"] for tag in ("rev-step10", "rev-step20")}
    assert [s["revision"] for s in ids.values()] == ["step10", "step20"]
    assert all(s["weights_id"].startswith("sha256:") for s in ids.values())
    assert ids["rev-step10"]["weights_id"] != ids["rev-step20"]["weights_id"]

    table = phiid.run_phiid_for_run(out, modes=["pooled"])
    assert set(table["file"]) == {"phiid_pooled__rev-step10.npz", "phiid_pooled__rev-step20.npz"}
    assert artifacts.tags("phiid", out, mode="pooled") == ["rev-step10", "rev-step20"]
    sts = [phiid.load_phiid(out / f"phiid_pooled__rev-{r}.npz")["sts"] for r in ("step10", "step20")]
    assert not np.allclose(np.nan_to_num(sts[0]), np.nan_to_num(sts[1]))
    np.testing.assert_array_equal(sts[0], phiid.phiid_all_pairs(early, mode="pooled")["sts"])
