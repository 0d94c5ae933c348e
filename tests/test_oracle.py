"""lib.experiments.oracle: attribution-patching head importance against finite differences, the prompt split with notebook 05,
and the oracle ordering through rankings.csv and the ablation."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lib.experiments import ablation as A
from lib.storage import artifacts
from lib.experiments import oracle as O
from lib.experiments import ranking as rk
from lib.model.hooks import hooks
from lib.model.loading import load_model
from lib.model.prompts import Prompt
from lib.storage.store import ArtifactError
from tests.test_ablation import left_padded_prompts

PROMPT_LENGTHS = (3, 5, 4)
T = 3


@pytest.fixture(scope="module")
def tiny64():
    """The tiny random Llama in float64 with its vocabulary cut to 2,048 tokens (the test's token ids are < 2000;
    the float64 unembedding of 49,152 tokens dominated the finite differences' time)."""
    model, tok, arch = load_model("random:llama")
    model.resize_token_embeddings(2048)
    return model.double(), tok, arch


def fake_run(arch, prompt_lengths=PROMPT_LENGTHS, n_tokens=T, seed=0, categories=None):
    """An ActivationRun-like object: random left-padded prompts and 'generated' tokens."""
    rng = np.random.default_rng(seed)
    ids = left_padded_prompts(rng, prompt_lengths)
    layer, head = arch.head_map()
    categories = categories or ["a"] * len(prompt_lengths)
    return SimpleNamespace(prompt_input_ids=ids, prompt_lengths=np.array(prompt_lengths),
                           tokens=rng.integers(3, 2000, (len(prompt_lengths), n_tokens)),
                           prompts=[Prompt(i, c, f"p{i}") for i, c in enumerate(categories)],
                           head_layer=np.array(layer), head_index=np.array(head), pad_token_id=2, model="random:llama")


def nll_with_scales(model, arch, seq, targets, scales: torch.Tensor) -> np.ndarray:
    """Independent path: one prompt, the full model (logits of the last T positions), float64 log-softmax; row r
    has every head's output at every position multiplied by scales[r] [rows, positions, heads]. -> L per row."""
    n_heads, d = arch.n_heads, arch.head_dim
    out = []
    for chunk in torch.split(scales, 64):
        def scale(layer, z, chunk=chunk):
            s = chunk[:, :, layer * n_heads:(layer + 1) * n_heads].to(z.dtype)
            return (z.unflatten(-1, (n_heads, d)) * s[..., None]).flatten(-2)

        ids = torch.as_tensor(seq)[None].repeat(len(chunk), 1)
        with torch.inference_mode(), hooks(arch, {"head_out": scale}):
            logits = model(input_ids=ids, logits_to_keep=len(targets)).logits
        logp = logits.double().log_softmax(-1)[:, torch.arange(len(targets)), torch.as_tensor(targets)]
        out.append((-logp.mean(-1)).numpy())
    return np.concatenate(out)


def derivative(f, eps=1e-2):
    """d f / d eps at 0 by central differences with one Richardson step (error O(eps^4)): the tiny model's RMSNorm
    computes in float32 even in a float64 model, so eps cannot be small (rounding ~1e-8 in L)."""
    central = lambda e: (f(e) - f(-e)) / (2 * e)                                      # noqa: E731
    return (4 * central(eps / 2) - central(eps)) / 3


def finite_difference(model, arch, run, row):
    """d L / d eps of scaling one head's slice at one position by (1 - eps): -> [positions, heads] (the first-order
    NLL change of zeroing that slice at that position), and L."""
    (seq,), _ = O.sequences(run, [row])
    targets = run.tokens[row]
    P, H = len(seq), arch.total_heads
    cells = [(i, h) for i in range(P) for h in range(H)]

    def L(eps):
        scales = torch.ones(len(cells), P, H, dtype=torch.float64)
        for r, (i, h) in enumerate(cells):
            scales[r, i, h] = 1 - eps
        return nll_with_scales(model, arch, seq, targets, scales)

    clean = nll_with_scales(model, arch, seq, targets, torch.ones(1, P, H, dtype=torch.float64))[0]
    return derivative(L).reshape(P, H), clean


def test_attribution_equals_finite_differences_per_position(tiny64):
    model, _, arch = tiny64
    run = fake_run(arch)
    res = O.compute_oracle(model, arch, run, n_prompts=3, batch_size=3, progress=False)   # batched, left-padded
    fd = [finite_difference(model, arch, run, r) for r in range(3)]
    per_prompt_abs = np.array([np.abs(d).sum(0) for d, _ in fd])                # [prompts, heads]
    per_prompt_signed = np.array([d.sum(0) for d, _ in fd])
    np.testing.assert_allclose(res.per_prompt, per_prompt_abs, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(res.score, per_prompt_abs.mean(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(res.signed, per_prompt_signed.mean(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(res.nll, [L for _, L in fd], rtol=1e-6)
    assert (np.abs(per_prompt_signed) < per_prompt_abs - 1e-9).any()            # the |.| is per position, not total
    assert np.ptp(res.score) > 0.1 * res.score.mean()                           # heads differ: an ordering exists


def test_signed_score_is_the_directional_derivative_of_zeroing_the_whole_head(tiny64):
    """signed[h] = d L / d eps when head h is scaled by (1 - eps) at every position at once."""
    model, _, arch = tiny64
    run = fake_run(arch, prompt_lengths=(6,), seed=3)
    res = O.compute_oracle(model, arch, run, n_prompts=1, progress=False)
    (seq,), _ = O.sequences(run, [0])
    H = arch.total_heads

    def L(eps):
        scales = torch.ones(H, len(seq), H, dtype=torch.float64)
        for h in range(H):
            scales[h, :, h] = 1 - eps
        return nll_with_scales(model, arch, seq, run.tokens[0], scales)

    np.testing.assert_allclose(res.signed, derivative(L), rtol=1e-3, atol=1e-5)


def test_gradients_leave_the_model_unchanged(tiny64):
    model, _, arch = tiny64
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    O.compute_oracle(model, arch, fake_run(arch), n_prompts=2, progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in model.named_parameters())


def test_oracle_prompts_are_the_last_of_each_category_and_disjoint_from_the_ablation():
    cats = np.array(["x"] * 4 + ["y"] * 4 + ["z"] * 4)
    assert O.select_oracle_rows(cats, 6) == [2, 3, 6, 7, 10, 11]
    assert O.select_oracle_rows(cats, 4) == [2, 3, 7, 11]                       # x takes the remainder
    held = O.select_oracle_rows(cats, 6)
    assert A.select_prompt_rows(cats, 6, exclude=held) == [0, 1, 4, 5, 8, 9]
    assert A.select_prompt_rows(cats, None, exclude=held) == [0, 1, 4, 5, 8, 9]
    assert A.select_prompt_rows(cats, 3, exclude=held) == [0, 4, 8]
    with pytest.raises(ValueError, match="not used by the oracle"):
        A.select_prompt_rows(cats, 7, exclude=held)
    with pytest.raises(ValueError, match="oracle_prompts"):
        O.select_oracle_rows(cats, 13)


def write_oracle_run(folder, model, arch):
    """activations.npz + rankings.csv (tests.test_ablation.write_run) + oracle.npz + the oracle column."""
    from tests.test_ablation import write_run
    write_run(folder, arch, prompt_lengths=(5, 9, 7, 6))                    # categories a, b, a, b
    act = artifacts.load("activations", folder, require=[])
    run = SimpleNamespace(prompt_input_ids=act["prompt_input_ids"], prompt_lengths=act["prompt_lengths"],
                          tokens=act["tokens"], pad_token_id=2, model="random:llama",
                          prompts=[Prompt(int(i), str(c), "") for i, c in zip(act["prompt_ids"], act["prompt_category"])],
                          head_layer=act["head_layer"], head_index=act["head_index"])
    res = O.compute_oracle(model, arch, run, n_prompts=2, progress=False)
    res.save(folder)
    inputs = SimpleNamespace(head_layer=act["head_layer"], head_index=act["head_index"])
    score = rk.oracle_score(folder, inputs)
    rankings = pd.read_csv(folder / "rankings.csv")
    rankings[rk.ORACLE] = score
    rankings.to_csv(folder / "rankings.csv", index=False)
    return res, score


def test_oracle_column_and_ordering_go_through_the_ablation(tmp_path):
    model, _, arch = load_model("random:llama")
    res, score = write_oracle_run(tmp_path, model, arch)
    assert res.rows.tolist() == [2, 3]                                          # the last of categories a and b
    assert score.min() == 0 and score.max() == 1 and np.argmax(score) == np.argmax(res.score)
    inputs, plan = A.prepare(tmp_path, model="random:llama", variants=["rank_diff", "oracle"], n_random=2,
                             fractions=[0.25, 0.5, 1.0], n_matched=1)
    assert inputs.prompt_ids.tolist() == [0, 1] and inputs.held_out_prompt_ids.tolist() == [2, 3]
    oracle_order = [o for o in plan.orderings if o.kind == "ranking" and o.variant == "oracle"][0].order
    assert list(oracle_order) == np.argsort(-res.score, kind="stable").tolist()  # most important removed first
    result = A.run_ablation(model, arch, inputs, plan, progress=False)
    auc = result.auc_table(n_boot=50)
    assert set(zip(auc.variant, auc.ordering)) == {(v, k) for v in ("rank_diff", "oracle") for k in ("ranking", "reverse")}
    assert np.isfinite(auc.auc_ratio).all() and (auc.n_matched == 1).all()
    # without the oracle among the variants, 05 keeps every prompt
    inputs, _ = A.prepare(tmp_path, model="random:llama", variants=["rank_diff"], n_random=1, fractions=[1.0])
    assert inputs.prompt_ids.tolist() == [0, 1, 2, 3]


def test_missing_or_foreign_oracle_fails_clearly(tmp_path):
    from tests.test_ablation import write_run
    _, _, arch = load_model("random:llama")
    write_run(tmp_path, arch)
    rankings = pd.read_csv(tmp_path / "rankings.csv").assign(oracle=0.5)
    rankings.to_csv(tmp_path / "rankings.csv", index=False)
    with pytest.raises(ArtifactError, match="oracle.npz is missing"):
        A.prepare(tmp_path, model="random:llama", variants=["oracle"])
    layer, head = arch.head_map()
    inputs = SimpleNamespace(head_layer=np.array(layer), head_index=np.array(head))
    assert rk.oracle_score(tmp_path, inputs) is None                              # no oracle.npz: no column
    H = arch.total_heads
    artifacts.save("oracle", tmp_path, dict(score=np.ones(H), signed=np.ones(H), per_prompt=np.ones((1, H)),
                                            nll=np.ones(1), prompt_ids=np.array([3]), rows=np.array([3]),
                                            head_layer=np.array(layer)[::-1].copy(), head_index=np.array(head),
                                            model="x", extraction_key="", seconds=0.0))
    with pytest.raises(ArtifactError, match="another head map"):
        rk.oracle_score(tmp_path, inputs)


def test_run_oracle_disabled_removes_a_stale_file(tmp_path):
    (tmp_path / "oracle.npz").write_bytes(b"stale")
    assert O.run_oracle(tmp_path, None, None, None, enabled=False) is None
    assert not (tmp_path / "oracle.npz").exists()
