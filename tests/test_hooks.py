"""Every hook site on every tiny architecture against an independent computation, replacement against weight
edits, and the guarantees of the contexts (handles removed, weights restored bit-exactly, also after an error)."""
import pytest
import torch
import torch.nn.functional as F

from lib.model.hooks import hooks, patched_weights
from lib.model.architectures import SITES
from tests import manual_attention
from tests.conftest import cached_model

IDS = torch.tensor([[5, 17, 230, 9, 41, 3000, 12], [7, 7, 8, 100, 2000, 5, 6]])


def capture(arch, model, sites, **kwargs):
    """Run the model once recording every layer of `sites` -> ({site: {layer: tensor}}, model output)."""
    got = {s: {} for s in sites}
    fns = {s: (lambda layer, x, s=s: got[s].__setitem__(layer, x.detach().clone())) for s in sites}
    with torch.no_grad(), hooks(arch, fns):
        out = model(input_ids=IDS, **kwargs)
    return got, out


def linear(module, x):
    """The module's affine map written out (nn.Linear [out, in]; GPT-2's Conv1D [in, out])."""
    weight = module.weight if isinstance(module, torch.nn.Linear) else module.weight.T
    return F.linear(x, weight, module.bias)


def mlp_activations(arch, layer, x):
    """The neuron activations from the MLP input by hand: act(gate(x)) * up(x), or act(fc(x)) without a gate."""
    mlp = arch.mlp(layer)
    if hasattr(mlp, "gate_proj"):
        return mlp.act_fn(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x)
    fc = mlp.dense_h_to_4h if hasattr(mlp, "dense_h_to_4h") else mlp.c_fc
    return mlp.act(linear(fc, x))


def mlp_inputs(arch, model):
    """The MLP module's input per layer, read with a plain torch hook (not lib.model.hooks)."""
    seen = {}
    handles = [arch.mlp(l).register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0].clone()))
               for l in range(arch.n_layers)]
    try:
        with torch.no_grad():
            model(input_ids=IDS)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_head_out_equals_hand_attention(every_arch):
    name, model, _, arch = every_arch
    manual_model, _, manual_arch = cached_model(f"random:{name}", manual_attention.NAME)
    manual_attention.captured.clear()
    got, _ = capture(manual_arch, manual_model, ["head_out"])
    for l in range(arch.n_layers):
        heads = manual_attention.captured[id(manual_arch.attention(l))][0]           # [b, heads, pos, d]
        assert got["head_out"][l].shape == (2, IDS.shape[1], arch.n_heads * arch.head_dim)
        torch.testing.assert_close(got["head_out"][l], heads.transpose(1, 2).flatten(-2), atol=1e-6, rtol=1e-5)


def test_attn_out_mlp_act_mlp_out_resid_post_by_hand(every_arch):
    _, model, _, arch = every_arch
    got, out = capture(arch, model, list(SITES), output_hidden_states=True)
    x_mlp = mlp_inputs(arch, model)
    for l in range(arch.n_layers):
        torch.testing.assert_close(got["attn_out"][l], linear(arch.attn_out(l), got["head_out"][l]))
        torch.testing.assert_close(got["mlp_act"][l], mlp_activations(arch, l, x_mlp[l]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["mlp_out"][l], linear(arch.mlp_down(l), got["mlp_act"][l]))
        assert got["mlp_act"][l].shape[-1] == arch.d_mlp and got["resid_post"][l].shape[-1] == arch.hidden_size
    for l in range(arch.n_layers - 1):                       # hidden_states[l + 1] is block l's output
        assert torch.equal(got["resid_post"][l], out.hidden_states[l + 1])
    last = arch.final_norm()(got["resid_post"][arch.n_layers - 1])     # the last one has the final norm applied
    torch.testing.assert_close(last, out.hidden_states[-1])


def test_one_layer_key_and_order(every_arch):
    _, model, _, arch = every_arch
    calls = []
    with torch.no_grad(), hooks(arch, {("mlp_act", 2): lambda l, x: calls.append(("a", l)),
                                       "resid_post": lambda l, x: calls.append(("r", l))}):
        model(input_ids=IDS)
    assert calls == [("r", 0), ("r", 1), ("a", 2), ("r", 2), ("r", 3)]


def zero_params(*modules):
    return {p: torch.zeros_like for m in modules for p in m.parameters(recurse=False)}


@pytest.mark.parametrize("site", ["head_out", "attn_out", "mlp_act", "mlp_out"])
def test_replacement_equals_zeroed_weights(every_arch, site):
    """Returning zeros at a site = zeroing the weights that produce (post) or read (pre) it."""
    _, model, _, arch = every_arch
    layer = 1
    module = {"head_out": arch.attn_out(layer), "attn_out": arch.attn_out(layer),
              "mlp_act": arch.mlp_down(layer), "mlp_out": arch.mlp_down(layer)}[site]
    patch = {module.weight: torch.zeros_like} if site in ("head_out", "mlp_act") else zero_params(module)
    if site in ("head_out", "mlp_act") and module.bias is not None:       # a zero input still passes the bias
        patch = {module.weight: torch.zeros_like}
    with torch.no_grad():
        clean = model(input_ids=IDS).logits
        with hooks(arch, {(site, layer): lambda l, x: torch.zeros_like(x)}):
            hooked = model(input_ids=IDS).logits
        with patched_weights(patch):
            edited = model(input_ids=IDS).logits
    torch.testing.assert_close(hooked, edited, atol=1e-5, rtol=1e-5)
    assert (hooked - clean).abs().max() > 1e-4


def test_resid_post_replacement_reaches_the_logits(every_arch):
    _, model, _, arch = every_arch
    h = torch.randn(2, IDS.shape[1], arch.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hooks(arch, {("resid_post", arch.n_layers - 1): lambda l, x: h}):
        logits = model(input_ids=IDS).logits
        torch.testing.assert_close(logits, arch.logits_from_hidden(h), atol=1e-5, rtol=1e-5)


def all_hooks(arch):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in arch.model.modules())


def test_handles_removed_after_an_exception(every_arch):
    _, model, _, arch = every_arch
    own = all_hooks(arch)                       # hooks transformers itself installs on some models
    def boom(layer, x):
        raise RuntimeError("inside the hook")
    with pytest.raises(RuntimeError, match="inside the hook"):
        with torch.no_grad(), hooks(arch, {s: boom for s in SITES}):
            model(input_ids=IDS)
    assert all_hooks(arch) == own
    with pytest.raises(ZeroDivisionError):
        with hooks(arch, {"head_out": lambda l, x: None}):
            assert all_hooks(arch) == own + arch.n_layers
            1 / 0
    assert all_hooks(arch) == own


def test_bad_site_or_layer_installs_nothing(every_arch):
    _, _, _, arch = every_arch
    own = all_hooks(arch)
    for fns, message in [({"attn_in": print}, "unknown hook site 'attn_in'"),
                         ({"head_out": print, ("mlp_act", 9): print}, "layer 9 out of range"),
                         ({3: print}, "site name or \\(site, layer\\)")]:
        with pytest.raises(ValueError, match=message):
            with hooks(arch, fns):
                pass
        assert all_hooks(arch) == own


def test_patched_weights_restores_bit_exactly_after_an_exception(every_arch):
    _, model, _, arch = every_arch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q, q_index = arch.head_weight_slices(1, 2)["q"]
    o, o_index = arch.head_weight_slices(1, 2)["o"]
    with pytest.raises(KeyError):
        with patched_weights([((q, q_index), lambda w: w * 1.1 + 1e-3), ((o, o_index), torch.zeros_like),
                              (arch.mlp_down(0).weight, torch.full_like(arch.mlp_down(0).weight, 0.3)),
                              ((o, o_index), lambda w: w + 1.0)]):          # the same slice twice
            assert torch.equal(o[o_index], torch.ones_like(o[o_index]))
            assert (arch.mlp_down(0).weight == 0.3).all()
            assert not torch.equal(q, before[name_of(model, q)])
            {}["missing"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def name_of(model, tensor):
    return next(n for n, p in model.named_parameters() if p is tensor)


def test_head_weight_slices_index_the_kv_head_of_the_group(every_arch):
    """Perturbing head h's V slice changes exactly the query heads that share its KV head; its O slice only h."""
    _, model, _, arch = every_arch
    layer, head = 1, arch.n_heads - 1
    slices = arch.head_weight_slices(layer, head)
    group = [h for h in range(arch.n_heads) if h // (arch.n_heads // arch.n_kv_heads) == head // (arch.n_heads // arch.n_kv_heads)]
    assert arch.kv_head(head) == head * arch.n_kv_heads // arch.n_heads
    clean, _ = capture(arch, model, ["head_out"])
    with patched_weights([(slices["v"], lambda w: w + torch.randn_like(w))]):     # (a constant would vanish under LayerNorm)
        moved, _ = capture(arch, model, ["head_out"])
    diff = (moved["head_out"][layer] - clean["head_out"][layer]).abs().unflatten(-1, (arch.n_heads, arch.head_dim))
    changed = [h for h in range(arch.n_heads) if diff[..., h, :].max() > 1e-6]
    assert changed == group
    weight, index = slices["o"]
    assert weight is arch.attn_out(layer).weight
    sub = weight[index]
    assert sub.shape == ((arch.head_dim, arch.hidden_size) if arch.weights_transposed else (arch.hidden_size, arch.head_dim))
    with pytest.raises(ValueError, match="head 4 out of range"):
        arch.head_weight_slices(0, arch.n_heads)


def test_innermost_sees_the_output_before_another_context_rewrites_it(every_arch):
    _, model, _, arch = every_arch
    seen = {}
    with torch.no_grad(), hooks(arch, {("mlp_out", 0): lambda l, x: torch.zeros_like(x)}):
        with hooks(arch, {("mlp_out", 0): lambda l, x: seen.__setitem__("after", x.abs().max())}):
            with hooks(arch, {("mlp_out", 0): lambda l, x: seen.__setitem__("before", x.abs().max())}, innermost=True):
                model(input_ids=IDS)
    assert seen["after"] == 0 and seen["before"] > 0
