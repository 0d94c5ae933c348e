"""lib.experiments.local against independent truth: hand-made token kinds, numpy correlations, an unbatched full-logit forward
pass, lib.estimators.phiid's own local engine, and bad inputs (tokens of another run)."""
import numpy as np
import pytest

from lib.storage import artifacts, store
from lib.experiments import local
from lib.estimators.phiid import phiid_local_head_means
from lib.storage.store import ArtifactError


def test_token_kinds_by_hand():
    texts = {0: "Hello", 1: ",", 2: " 42", 3: "<|im_end|>", 4: " ", 5: "x", 6: "?!"}
    tokens = np.array([[4, 0, 1, 2, 3, 5], [2, 6, 0, 0, 0, 0]])
    kinds = local.token_kinds(tokens, texts, {3}, np.array(["Grammar", "Basic Numerical Reasoning"]))
    assert list(kinds) == list(local.KINDS)
    np.testing.assert_array_equal(kinds["punctuation"], [[0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(kinds["digit"], [[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(kinds["first_answer"], [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(kinds["end_of_turn"], [[0, 0, 0, 0, 1, 0], [0] * 6])
    np.testing.assert_array_equal(kinds["after_end_of_turn"], [[0, 0, 0, 0, 0, 1], [0] * 6])
    np.testing.assert_array_equal(kinds["digit_numerical"], [[0] * 6, [1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(kinds["other"], [[1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])


def test_step_correlations_equal_numpy_and_null_brackets_noise():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((20, 50))
    values = np.stack([target + rng.standard_normal((20, 50)), rng.standard_normal((20, 50))])
    values[1, 3, 7] = np.nan                                   # an undefined step is left out
    t = local.step_correlations(values, target, n_null=300, seed=1)
    np.testing.assert_allclose(t["r"][0], np.corrcoef(values[0].ravel(), target.ravel())[0, 1], rtol=1e-12)
    ok = np.isfinite(values[1].ravel())
    np.testing.assert_allclose(t["r"][1], np.corrcoef(values[1].ravel()[ok], target.ravel()[ok])[0, 1], atol=1e-3)
    assert t["p"][0] < 0.01 and t["r"][0] > t["null_hi"][0]
    assert t["null_lo"][1] < t["r"][1] < t["null_hi"][1] and t["null_lo"][1] < 0 < t["null_hi"][1]
    assert t["n"].tolist() == [1000, 999]


def test_kind_means_planted_effect():
    rng = np.random.default_rng(2)
    values = rng.standard_normal((30, 40))
    mask = np.zeros((30, 40), bool)
    mask[:, 5] = True
    values[:, 5] += 3.0                                        # planted: the kind's steps are higher
    t = local.kind_means(values, {"planted": mask, "none": np.zeros_like(mask), "random": rng.random((30, 40)) < 0.2},
                         n_boot=300, n_null=300, seed=3).set_index("kind")
    np.testing.assert_allclose(t.loc["planted", "mean"], values[:, 5].mean())
    assert t.loc["planted", "ci_lo"] < t.loc["planted", "mean"] < t.loc["planted", "ci_hi"]
    assert t.loc["planted", "mean"] > t.loc["planted", "null_hi"] and t.loc["planted", "p"] < 0.01
    assert np.isnan(t.loc["none", "mean"]) and t.loc["none", "n_steps"] == 0
    assert t.loc["random", "null_lo"] < t.loc["random", "mean"] < t.loc["random", "null_hi"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lib.experiments.extract import extract_to_file
    out = tmp_path_factory.mktemp("local_run")
    extract_to_file(out, "random:llama", n_prompts=4, n_tokens=16, batch_size=4, progress=False)
    return out


def test_teacher_forced_pass_equals_unbatched_full_logits(tiny_run):
    import torch

    from lib.model.loading import load_model
    acts = artifacts.load("activations", tiny_run)
    model, _, _ = load_model("random:llama")
    entropy, surprisal, greedy = local.teacher_forced_steps(model, acts["prompt_input_ids"], acts["prompt_lengths"],
                                                            acts["tokens"], int(acts["pad_token_id"]), batch_size=3)
    assert greedy.mean() > 0.9                                  # the run's own greedy tokens
    width = acts["prompt_input_ids"].shape[1]
    for p in range(4):
        prompt = acts["prompt_input_ids"][p, width - acts["prompt_lengths"][p]:]
        ids = torch.as_tensor(np.concatenate([prompt, acts["tokens"][p]]))[None]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1).numpy()
        rows = logp[len(prompt) - 1: len(prompt) - 1 + 16]       # positions predicting tokens 0..15
        np.testing.assert_allclose(surprisal[p], -rows[np.arange(16), acts["tokens"][p]], atol=1e-4)
        np.testing.assert_allclose(entropy[p], -(np.exp(rows) * rows).sum(-1), atol=1e-4)


def test_run_local_writes_through_artifacts_and_matches_the_engine(tiny_run):
    results = local.run_local(tiny_run, "random:llama", tags=["", "random_init"], n_null=20, n_boot=20)
    assert list(results) == [""]                                # no random_init file in this run: skipped
    saved = local.load_local(tiny_run)
    X = artifacts.load("activations", tiny_run)["activations"]
    ref = phiid_local_head_means(X, atoms=("sts", "rtr"))
    np.testing.assert_array_equal(saved["sts"], ref["sts"])
    np.testing.assert_array_equal(saved["rtr"], ref["rtr"])
    tokens = artifacts.load("activations", tiny_run)["tokens"]
    np.testing.assert_array_equal(saved["token_ids"], tokens[:, :-1])     # tau = 1: the token read at step t + 1
    assert saved["entropy"].shape == (4, 15) and list(saved["kind_names"]) == list(local.KINDS)
    summary = artifacts.load("local_summary", tiny_run)
    assert set(summary["tags"]) == {"trained"} and len(summary["tags"]["trained"]["kinds"]) == 2 * len(local.KINDS)


def test_tokens_of_another_run_raise_and_write_nothing(tiny_run, tmp_path):
    acts = artifacts.load("activations", tiny_run)
    acts["tokens"] = np.random.default_rng(4).integers(0, 1000, size=acts["tokens"].shape)
    artifacts.save("activations", tmp_path, acts)
    with pytest.raises(ArtifactError, match="reproduces only .* another run"):
        local.run_local(tmp_path, "random:llama", tags=[""], n_null=5, n_boot=5)
    assert not artifacts.path("local_phiid", tmp_path).exists()
    assert not artifacts.path("local_summary", tmp_path).exists()
    acts["tokens"] = acts["tokens"][:, :-2]          # a file mixed outside the contract (artifacts.save refuses it)
    store.save_npz(artifacts.path("activations", tmp_path), **acts)
    with pytest.raises(ArtifactError, match="mixes two runs|do not describe the same steps"):
        local.run_local(tmp_path, "random:llama", tags=[""], n_null=5, n_boot=5)
