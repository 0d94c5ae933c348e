"""The artifact contract (lib.storage.artifacts): file names, tags, shards, checked save/load, the README's table, and that
every file the pipeline's library functions write is a registered artifact."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib import REPO_ROOT
from lib.storage import artifacts
from lib.storage.store import ArtifactError, save_npz

H, P, T = 6, 4, 20


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def activation_arrays(seed=0, n_heads=H) -> dict:
    """A complete, correctly typed activations file of 3 layers x 2 heads."""
    rng = np.random.default_rng(seed)
    return dict(
        activations=rng.normal(5.0, 1.0, size=(P, n_heads, T)).astype(np.float32),
        tokens=rng.integers(3, 100, (P, T)), prompt_input_ids=rng.integers(3, 100, (P, 7)),
        prompt_lengths=np.full(P, 7), prompt_ids=np.arange(P), prompt_category=np.array(["a", "b"] * (P // 2)),
        prompt_text=np.array([f"prompt {i}" for i in range(P)]), head_layer=np.repeat(np.arange(n_heads // 2), 2),
        head_index=np.tile([0, 1], n_heads // 2), n_layers=n_heads // 2, n_heads=2, n_kv_heads=1, pad_token_id=0,
        model="synthetic", chat_template=False, seconds=0.5)


# ----------------------------------------------------------------------------------------------------------------
# names

def test_path_patterns(tmp_path):
    assert artifacts.path("activations", tmp_path) == tmp_path / "activations.npz"
    assert artifacts.path("activations", tmp_path, "random_init") == tmp_path / "activations__random_init.npz"
    assert artifacts.path("activations", tmp_path, artifacts.revision_tag("step1000")).name == \
        "activations__rev-step1000.npz"
    assert artifacts.path("phiid", tmp_path, mode="pooled").name == "phiid_pooled.npz"
    assert artifacts.path("phiid", tmp_path, "random_init", mode="concat").name == "phiid_concat__random_init.npz"
    assert artifacts.path("diagnostics", tmp_path, "rev-step20").name == "diagnostics__rev-step20.json"
    assert artifacts.path("ablation_checkpoint", tmp_path, digest="0123abcd").name == "ablation_checkpoint_0123abcd.npz"
    assert artifacts.path("ablation_checkpoint", tmp_path, shard=(2, 3)) == tmp_path / "ablation_shards" / "shard-2-of-3.npz"
    assert artifacts.path("neuron_effects", tmp_path, shard=(1, 4)) == \
        tmp_path / ".neuron_shards" / "neuron_effects__shard-1-of-4.csv"           # the default shard name
    assert artifacts.path("extract_checkpoint", tmp_path, key="k1", start=12, batch_size=6) == \
        tmp_path / ".extract_checkpoints" / "k1" / "batch-00012-6.npz"


@pytest.mark.parametrize("call, message", [
    (lambda d: artifacts.path("phiid", d), r"needs the field 'mode'"),
    (lambda d: artifacts.path("activations", d, "../x"), r"tag '\.\./x' must be a plain name"),
    (lambda d: artifacts.path("rankings", d, shard=(1, 2)), r"'rankings' has no shard files"),
    (lambda d: artifacts.path("activation", d), r"unknown artifact 'activation'"),
])
def test_bad_names_are_refused(tmp_path, call, message):
    with pytest.raises(ArtifactError, match=message):
        call(tmp_path)


def test_identify_inverts_path(tmp_path):
    cases = [("activations", "", {}), ("activations", "rev-step1000", {}), ("phiid", "random_init", {"mode": "per_prompt"}),
             ("diagnostics", "", {}), ("ablation_checkpoint", "", {"digest": "abc123"}), ("manifest", "", {})]
    for name, tag, fields in cases:
        rel = artifacts.path(name, "", tag, **fields)
        a, found = artifacts.identify(rel)
        assert a.name == name and found.get("tag", "") == tag
        assert all(found[k] == v for k, v in fields.items())
    assert artifacts.identify("ablation_shards/shard-2-of-3.npz")[1] == {"shard": (2, 3)}
    assert artifacts.identify(".activations.npz.x1y2.tmp.npz") is None       # an atomic write in progress
    assert artifacts.identify("notes.txt") is None
    assert artifacts.identify("html/index.html")[0].name == "run_index"
    assert artifacts.identify("html/05_ablation.html")[1] == {"notebook": "05_ablation"}


# ----------------------------------------------------------------------------------------------------------------
# tags and shards

def test_tags_discovery_in_training_order(tmp_path):
    for tag in ("rev-step1000", "random_init", "rev-step20", "other"):
        save_npz(artifacts.path("activations", tmp_path, tag), x=np.zeros(1))
    save_npz(tmp_path / ".activations__rev-step5.npz.abc.tmp.npz", x=np.zeros(1))    # temporary file: not a tag
    save_npz(artifacts.path("phiid", tmp_path, "random_init", mode="pooled"), x=np.zeros(1))
    assert artifacts.tags("activations", tmp_path) == ["random_init", "rev-step20", "rev-step1000", "other"]
    save_npz(artifacts.path("activations", tmp_path), x=np.zeros(1))
    assert artifacts.tags("activations", tmp_path)[0] == ""
    assert artifacts.tags("phiid", tmp_path, mode="pooled") == ["random_init"]
    assert artifacts.tags("phiid", tmp_path, mode="concat") == []
    assert artifacts.tags("activations", tmp_path / "absent") == []


def test_shards_discovery(tmp_path):
    assert artifacts.shards("ablation_checkpoint", tmp_path) == {}
    for i in (1, 3):
        save_npz(artifacts.path("ablation_checkpoint", tmp_path, shard=(i, 3)), x=np.zeros(1))
    (tmp_path / "ablation_shards" / "shard-x-of-3.npz").write_text("not a shard")
    found = artifacts.shards("ablation_checkpoint", tmp_path)
    assert found == {(1, 3): tmp_path / "ablation_shards" / "shard-1-of-3.npz",
                     (3, 3): tmp_path / "ablation_shards" / "shard-3-of-3.npz"}
    for i in (2, 1):
        artifacts.save("neuron_shard_info", tmp_path, {"settings": {}, "shard": f"{i}/2", "n_rows": 0}, shard=(i, 2))
    assert list(artifacts.shards("neuron_shard_info", tmp_path)) == [(1, 2), (2, 2)]
    assert artifacts.identify(".neuron_shards/neuron_effects__shard-2-of-2.json")[0].name == "neuron_shard_info"


# ----------------------------------------------------------------------------------------------------------------
# save: checked before anything is written

@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(activations=a["activations"].astype(np.float64)), r"'activations' has dtype float64, expected float32"),
    (lambda a: a.update(activations=a["activations"][0]), r"'activations' has shape \(6, 20\), expected \[prompts, heads, steps\]"),
    (lambda a: a.update(tokens=a["tokens"].astype(np.float32)), r"'tokens' has dtype float32, expected int"),
    (lambda a: a.pop("head_layer"), r"key 'head_layer' is missing"),
    (lambda a: a.update(head_layer=np.arange(H + 1)), r"axis 'heads' has length 7 in 'head_layer' but 6"),
])
def test_save_refuses_bad_arrays_and_writes_nothing(tmp_path, change, message):
    arrays = activation_arrays()
    change(arrays)
    out = tmp_path / "run"
    with pytest.raises(ArtifactError, match=message):
        artifacts.save("activations", out, arrays)
    assert not out.exists()                                          # no file, no temporary file, no folder


def test_save_load_round_trip_and_optional_keys(tmp_path):
    arrays = activation_arrays()
    path = artifacts.save("activations", tmp_path, arrays, tag="random_init")
    assert path == tmp_path / "activations__random_init.npz" and listing(tmp_path) == [path.name]
    loaded = artifacts.load("activations", tmp_path, "random_init")
    assert set(loaded) == set(arrays)                                  # extraction_key is optional
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
    assert loaded["activations"].dtype == np.float32
    only = artifacts.load("activations", tmp_path, "random_init", keys=["tokens"])
    assert list(only) == ["tokens"]


def test_load_checks_kind_not_exact_dtype_and_required_keys(tmp_path):
    """A reader accepts a float64 activations file (dtype kind) but not a missing required key."""
    save_npz(artifacts.path("activations", tmp_path), activations=np.zeros((P, H, T)), head_layer=np.zeros(H, int),
             head_index=np.zeros(H, int))
    got = artifacts.load("activations", tmp_path, require=["activations", "head_layer", "head_index"])
    assert got["activations"].dtype == np.float64
    with pytest.raises(ArtifactError, match=r"activations\.npz: key 'tokens' is missing.*01_extract_activations"):
        artifacts.load("activations", tmp_path)


def test_csv_and_json_checks(tmp_path):
    with pytest.raises(ArtifactError, match="key 'head_idx' is missing"):
        artifacts.save("rankings", tmp_path, pd.DataFrame({"layer": [0], "head": [0]}))
    with pytest.raises(ArtifactError, match=r"'syn_red' is a list, expected dict"):
        artifacts.save("diagnostics", tmp_path, {"n_prompts": 1, "n_heads": 2, "n_steps": 3, "syn_red": [],
                                                 "layer_profiles": {}, "per_head": {}, "all_files": [],
                                                 "mode": "per_prompt", "tag": ""})
    assert listing(tmp_path) == []
    frame = pd.DataFrame({"head_idx": [0, 1], "layer": [0, 0], "head": [0, 1], "rank_diff": [0.5, 1.0]})
    artifacts.save("rankings", tmp_path, frame)
    pd.testing.assert_frame_equal(artifacts.load("rankings", tmp_path), frame)


# ----------------------------------------------------------------------------------------------------------------
# load: unreadable files name the file and the notebook that writes it

def test_truncated_npz_is_an_artifact_error_naming_the_file(tmp_path):
    path = artifacts.save("activations", tmp_path, activation_arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"{path}.*truncated or corrupt.*01_extract_activations"):
        artifacts.load("activations", tmp_path)


def test_corrupt_json_is_an_artifact_error_naming_the_file(tmp_path):
    path = artifacts.path("ranking_summary", tmp_path)
    path.write_text('{"variants": ["rank_diff"], "n_prompts": ')
    with pytest.raises(ArtifactError, match=rf"{path}.*truncated or corrupt.*04_ranking_variants"):
        artifacts.load("ranking_summary", tmp_path)


def test_missing_file_names_the_producer(tmp_path):
    with pytest.raises(ArtifactError, match=r"missing artifact .*ablation_kl\.npz.*run 05_ablation first"):
        artifacts.load("ablation_kl", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# the README and the registry

def test_readme_holds_the_generated_outputs_table():
    readme = (REPO_ROOT / "README.md").read_text()
    assert artifacts.readme_with_table(readme) == readme, "README's artifacts table is stale: run " \
                                                          "python -m lib.storage.artifacts --readme"
    for a in artifacts.ARTIFACTS.values():
        assert f"`{artifacts.shown_name(a)}`" in readme


def test_every_artifact_has_a_known_format_and_producer():
    """Producers are notebooks (NN_name, possibly declared ahead of the notebook) or the runner and its report."""
    import re
    for a in artifacts.ARTIFACTS.values():
        assert a.format in artifacts.FORMATS, a.name
        assert re.fullmatch(r"\d\d_[a-z0-9_]+", a.producer) or a.producer in ("lib.run", "lib.report"), a.name


# ----------------------------------------------------------------------------------------------------------------
# what the library writes is registered

def test_files_written_by_notebooks_02_to_04_are_registered(tmp_path):
    from lib.experiments import diagnostics, ranking
    from lib.estimators.phiid import DegeneratePairWarning, run_phiid_for_run
    for tag, seed in (("", 0), ("random_init", 1)):
        artifacts.save("activations", tmp_path, activation_arrays(seed), tag=tag)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        run_phiid_for_run(tmp_path)
    diagnostics.run_diagnostics(tmp_path)
    inputs = ranking.load_inputs(tmp_path, ("rank_diff", "balance"))
    scores = inputs.scores()
    ranking.surrogate_scores(inputs, n_surrogates=2, out_dir=tmp_path)
    ranking.save_rankings(tmp_path, inputs, scores)
    files = listing(tmp_path)
    assert "ranking_surrogates.npz" in files and "diagnostics.json" in files and "phiid_pooled__random_init.npz" in files
    assert [f for f in files if artifacts.identify(f) is None] == []
    manifest = json.loads(artifacts.path("manifest", tmp_path).read_text())
    assert manifest["sections"]["04_ranking_variants"]["files"] == ["rankings.csv", "ranking_summary.json"]
    for f in files:
        if f.endswith((".npz", ".csv", ".json")):
            a, fields = artifacts.identify(f)
            artifacts.load(a.name, tmp_path, **fields)                     # each reads back with its checks


def test_ablation_result_saves_registered_files_and_its_manifest_section(tmp_path):
    import matplotlib.pyplot as plt

    from lib.experiments import ablation as A
    rng = np.random.default_rng(0)
    orderings = [A.Ordering("ranking", "rank_diff", -1, tuple(range(4))),
                 *[A.Ordering("random", A.RANDOM_VARIANT, s, tuple(rng.permutation(4))) for s in range(2)]]
    kl = np.sort(rng.random((3, 3, 2)), axis=1)
    kl[:, 0] = 0.0
    result = A.AblationResult(orderings, np.array([0, 2, 4]), 4, kl, np.arange(2), np.array(["a", "b"]),
                              model="synthetic")
    fig = plt.figure()
    with pytest.raises(ArtifactError, match="'rankings' is not an artifact of 05_ablation"):
        result.save(tmp_path, tables={"rankings": result.fraction_table()})
    assert listing(tmp_path) == []
    saved = result.save(tmp_path, tables={"ablation_fractions": result.fraction_table(),
                                          "ablation_auc": result.auc_table(n_boot=20)},
                        figures={"ablation_curves": fig}, manifest={"seed": 0})
    plt.close(fig)
    assert [p.name for p in saved] == ["ablation.csv", "ablation_kl.npz", "ablation_fractions.csv",
                                       "ablation_auc.csv", "ablation_curves.png"]
    assert all(artifacts.identify(f) is not None for f in listing(tmp_path))
    entry = json.loads(artifacts.path("manifest", tmp_path).read_text())["sections"]["05_ablation"]
    assert entry["seed"] == 0 and entry["files"] == [p.name for p in saved]
    loaded = A.AblationResult.load(tmp_path)
    np.testing.assert_array_equal(loaded.kl, kl)
    assert [o.order for o in loaded.orderings] == [o.order for o in orderings]
