"""RSO / compressed-gradient layers (subspace_optim.rso): gradients, saved tensors, merge, state, errors,
the controller, and equivalence with the GoLore optimizer."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subspace_optim import SubspaceAdamW, SubspaceSGD
from subspace_optim.rso import (
    RSOController,
    RSOLinear,
    apply_rso,
    merge_rso,
    random_rows,
    rso_layers,
)

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def model_state_storages(model):
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


class SavedRecorder:
    """Records every tensor autograd saves (saved_tensors_hooks), tagged with the RSO/Linear layer whose
    forward is running, and keeps the inputs of those layers (alive, so storages cannot be reused)."""

    def __init__(self, model, layer_type):
        self.saved, self.inputs, self.current = [], [], None
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, layer_type):
                self.handles.append(m.register_forward_pre_hook(lambda m, a, name=name: self._enter(name, a[0])))
                self.handles.append(m.register_forward_hook(lambda m, a, o: self._leave()))

    def _enter(self, name, x):
        self.current = name
        self.inputs.append((name, x))

    def _leave(self):
        self.current = None

    def _pack(self, t):
        self.saved.append((self.current, t))
        return t

    def run(self, fn):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            out = fn()
        for h in self.handles:
            h.remove()
        return out


# ------------------------------------------------------------------------------------------ math
def test_random_rows_orthonormal_and_regenerable():
    p = random_rows(5, 20, seed=1, index=2, count=3)
    assert p.shape == (5, 20)
    torch.testing.assert_close(p @ p.T, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(p, random_rows(5, 20, seed=1, index=2, count=3), atol=0, rtol=0)
    for other in (dict(seed=2, index=2, count=3), dict(seed=1, index=3, count=3), dict(seed=1, index=2, count=4)):
        assert not torch.allclose(p, random_rows(5, 20, **other))


def test_grad_of_B_is_projected_full_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).double()
    apply_rso(model, rank=4, seed=3)
    layer = model[0]
    with torch.no_grad():
        layer.B.normal_()  # a general point, not only B = 0
    x = torch.randn(5, 7, 12, dtype=torch.float64, requires_grad=True)
    loss = lambda y: y.tanh().square().sum()  # noqa: E731
    loss(model(x)).backward()

    P = layer.projection.P
    w_eff = (layer.weight + layer.B @ P).detach().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    loss(F.linear(x_ref, w_eff, bias)).backward()

    torch.testing.assert_close(layer.B.grad, w_eff.grad @ P.T)  # ∂L/∂B = (∂L/∂W) Pᵀ
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.bias.grad, bias.grad)
    assert not layer.weight.requires_grad and layer.weight.grad is None


def test_saved_tensors_are_rank_dimensional():
    torch.manual_seed(0)
    tokens, d_in, rank = 6 * 5, 16, 3
    x = torch.randn(6, 5, d_in, requires_grad=True)

    plain = nn.Sequential(nn.Linear(d_in, 8))
    rec = SavedRecorder(plain, nn.Linear)
    rec.run(lambda: plain(x)).sum().backward()
    acts = [t for _, t in rec.saved if t.untyped_storage().data_ptr() not in model_state_storages(plain)]
    assert [t.numel() for t in acts] == [tokens * d_in]  # nn.Linear saves x itself (as tokens x in)

    apply_rso(plain, rank=rank)
    rec = SavedRecorder(plain, RSOLinear)
    rec.run(lambda: plain(x)).sum().backward()
    acts = [t for _, t in rec.saved if t.untyped_storage().data_ptr() not in model_state_storages(plain)]
    assert acts and all(t.shape[-1] == rank and t.numel() == tokens * rank for t in acts)
    assert len({t.untyped_storage().data_ptr() for t in acts}) == 1


def test_shared_input_groups_save_one_projection_and_no_linear_input():
    ids = torch.randint(0, 64, (2, 10))
    baseline = tiny_llama()
    rec = SavedRecorder(baseline, nn.Linear)
    rec.run(lambda: baseline(ids, labels=ids).loss).backward()
    saved = {t.untyped_storage().data_ptr() for _, t in rec.saved}
    assert all(x.untyped_storage().data_ptr() in saved for _, x in rec.inputs)  # plain: every linear input saved

    model = apply_rso(tiny_llama(), rank=6)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.projection is attn.k_proj.projection is attn.v_proj.projection
    assert mlp.gate_proj.projection is mlp.up_proj.projection
    assert attn.o_proj.projection is not attn.q_proj.projection
    assert mlp.down_proj.projection is not mlp.gate_proj.projection

    rec = SavedRecorder(model, RSOLinear)
    rec.run(lambda: model(ids, labels=ids).loss).backward()
    params = model_state_storages(model)
    by_layers = [t for who, t in rec.saved if who is not None and t.untyped_storage().data_ptr() not in params]
    assert all(t.shape == (2, 10, 6) for t in by_layers)
    # q/k/v, o, gate/up, down: 4 projections per decoder layer, each saved once however many layers read it.
    assert len({t.untyped_storage().data_ptr() for t in by_layers}) == 4 * 2
    inputs = {name: x.untyped_storage().data_ptr() for name, x in rec.inputs}
    assert not set(inputs.values()) & {t.untyped_storage().data_ptr() for t in by_layers}
    # Nothing else keeps q/k/v's, gate/up's or down's input either. o_proj's input is a view of the attention
    # output, which SDPA saves for its own backward: RSO cannot save memory there.
    everything = {t.untyped_storage().data_ptr() for _, t in rec.saved}
    assert {n for n, d in inputs.items() if d in everything} == {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}


def test_group_members_with_different_inputs_are_correct():
    torch.manual_seed(0)
    model = apply_rso(tiny_llama(), rank=6)
    attn = model.model.layers[0].self_attn
    for layer in (attn.q_proj, attn.k_proj):
        with torch.no_grad():
            layer.B.normal_()
    x1, x2 = torch.randn(3, 32), torch.randn(3, 32)
    P = attn.q_proj.projection.P
    for layer, x in ((attn.q_proj, x1), (attn.k_proj, x2), (attn.q_proj, x1), (attn.q_proj, x2)):
        torch.testing.assert_close(layer(x), x @ (layer.weight + layer.B @ P).T)


# ----------------------------------------------------------------------------- model-level behaviour
def test_apply_rso_keeps_function_and_freezes_targeted_weights():
    ids = torch.randint(0, 64, (2, 10))
    model = tiny_llama()
    before = model(ids).logits
    apply_rso(model, rank=6)
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.requires_grad  # HF: no lm_head
    layers = rso_layers(model)
    assert len(layers) == 7 * 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{n}.B" for n in layers} <= trainable
    assert not any(n.endswith("proj.weight") for n in trainable)
    assert not any(k.endswith(".P") or k.endswith(".B.grad") for k in model.state_dict())


def test_merge_leaves_outputs_unchanged_and_draws_new_P():
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 10))
    model = apply_rso(tiny_llama(), rank=6)
    layers = list(rso_layers(model).values())
    for merge in range(2):
        with torch.no_grad():
            for layer in layers:
                layer.B.normal_(std=0.1)
        before = model(ids).logits
        old_P = layers[0].projection.P.clone()
        assert merge_rso(model) == merge + 1
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
        assert all(not layer.B.any() for layer in layers)
        assert not torch.allclose(layers[0].projection.P, old_P)
        assert all(layer.projection.outer_step == merge + 1 for layer in layers)


def test_state_dict_restores_counter_and_regenerates_P():
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 10))
    model = apply_rso(tiny_llama(), rank=6, seed=5)
    for _ in range(2):
        with torch.no_grad():
            for layer in rso_layers(model).values():
                layer.B.normal_(std=0.1)
        merge_rso(model)
    with torch.no_grad():
        for layer in rso_layers(model).values():
            layer.B.normal_(std=0.1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = apply_rso(tiny_llama(seed=9), rank=6, seed=0)  # other weights, other seed: the checkpoint wins
    fresh.load_state_dict(state)
    for (name, a), b in zip(rso_layers(model).items(), rso_layers(fresh).values()):
        assert b.projection.outer_step == 2, name
        torch.testing.assert_close(a.projection.P, b.projection.P, atol=0, rtol=0)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)
    copied = copy.deepcopy(model)  # the projection cache must not break copying
    torch.testing.assert_close(copied(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_autocast_bf16_on_cpu():
    torch.manual_seed(0)
    model = apply_rso(nn.Sequential(nn.Linear(16, 8)), rank=4)
    with torch.no_grad():
        model[0].B.normal_()
    x = torch.randn(4, 16)
    model(x).square().sum().backward()
    ref = model[0].B.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert model[0].B.grad.dtype == torch.float32
    torch.testing.assert_close(model[0].B.grad, ref, atol=0.1, rtol=0.05)


def test_autocast_bf16_whole_model_shares_one_projection_per_group():
    """Under autocast each member casts its input separately; q/k/v (and gate/up) must still compute and save one
    x Pᵀ, as in fp32: 4 saved projections per decoder layer, in bf16, and B's gradients close to fp32's."""
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    model = apply_rso(tiny_llama(), rank=6)
    with torch.no_grad():
        for layer in rso_layers(model).values():
            layer.B.normal_(std=0.1)
    model(ids, labels=ids).loss.backward()
    fp32_grads = [layer.B.grad.clone() for layer in rso_layers(model).values()]
    model.zero_grad()

    rec = SavedRecorder(model, RSOLinear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rec.run(lambda: model(ids, labels=ids).loss)
    loss.backward()
    params = model_state_storages(model)
    projections = {t.untyped_storage().data_ptr(): t for who, t in rec.saved
                   if who is not None and t.shape == (2, 10, 6) and t.untyped_storage().data_ptr() not in params}
    assert len(projections) == 4 * 2
    assert all(t.dtype == torch.bfloat16 for t in projections.values())
    for layer, ref in zip(rso_layers(model).values(), fp32_grads):
        assert layer.B.grad.dtype == torch.float32
        torch.testing.assert_close(layer.B.grad, ref, atol=0.05 * ref.abs().max().item(), rtol=0.1)


def test_rank_not_below_in_features_leaves_the_layer_dense_with_one_warning():
    """The optimizers' rule: a layer that the rank would not reduce is trained at full rank, with a warning."""
    model = tiny_llama()  # in_features 32 for q/k/v/o and gate/up, 48 for down_proj
    with pytest.warns(UserWarning, match=r"rank 32 >= in_features for 12 layer\(s\).*trained at full rank"):
        apply_rso(model, rank=32)
    assert set(rso_layers(model)) == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad  # a plain nn.Linear, trained as usual


# --------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    model = tiny_llama()
    for rank in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            apply_rso(model, rank=rank)
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_rso(model, rank=4, target=r"model\.embed_tokens")  # an nn.Embedding
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_rso(model, rank=4, target=["no_such_layer"])
    with pytest.raises(ValueError, match="seed"):
        apply_rso(model, rank=4, seed=-1)
    with pytest.raises(ValueError, match="apply_rso"):
        merge_rso(model)
    with pytest.raises(ValueError, match="apply_rso"):
        RSOController(model, torch.optim.SGD(model.parameters(), lr=0.1), update_gap=2)
    assert not rso_layers(model)  # nothing was half-converted by the failed calls

    apply_rso(model, rank=4, target=["q_proj", "v_proj"])
    assert set(rso_layers(model)) == {f"model.layers.{i}.self_attn.{k}_proj" for i in (0, 1) for k in "qv"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for gap in (0, 1.0, True):
        with pytest.raises(ValueError, match="update_gap"):
            RSOController(model, opt, update_gap=gap)
    for eta in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="eta"):
            RSOController(model, opt, update_gap=2, eta=eta)
    for moments in ("keep", "rotate", None):
        with pytest.raises(ValueError, match="moments must be 'reset' or 'project'"):
            RSOController(model, opt, update_gap=2, moments=moments)
    with pytest.raises(ValueError, match="does not train B"):
        RSOController(model, torch.optim.SGD(model.lm_head.parameters(), lr=0.1), update_gap=2)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        model(torch.randint(0, 64, (1, 4)))


# ----------------------------------------------------------------------------------- training
def _batches(n, d_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, d_in, generator=g), torch.randn(8, 24, generator=g)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return (model(x).tanh() - y).square().mean()


@pytest.mark.parametrize("moments", ["reset", "project"])
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_compressed_gradient_layer_takes_golore_steps(rule, moments):
    """GoLore's "ReLoRA-like" form: a rule stepping B in y = x Wᵀ + (x Pᵀ) Bᵀ with lr·α and merges every K steps
    takes the steps of the GoLore optimizer with scale α on W (right side, basis Q = Pᵀ), momentum SGD and AdamW
    alike, whether the moments restart at each merge/refresh or are carried into the new subspace."""
    d_in, rank, gap, scale = 16, 4, 3, 0.5
    lr = 0.5 if rule == "sgd" else 0.05
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(d_in, 24, bias=False))
    rso = copy.deepcopy(ref)
    apply_rso(rso, rank=rank, seed=7)
    layer = rso[0]
    start = ref[0].weight.detach().clone()
    common = dict(rank=rank, projector="golore", moments=moments, update_gap=gap, scale=scale, seed=7)
    if rule == "sgd":
        golore = SubspaceSGD(ref.parameters(), lr=lr, momentum=0.9, **common)
        inner = torch.optim.SGD([layer.B], lr=lr * scale, momentum=0.9)
    else:
        golore = SubspaceAdamW(ref.parameters(), lr=lr, weight_decay=0.0, **common)
        inner = torch.optim.AdamW([layer.B], lr=lr * scale, weight_decay=0.0)
    ctl = RSOController(rso, inner, update_gap=gap, moments=moments)
    for batch in _batches(3 * gap + 1, d_in):
        P = layer.projection.P.clone()
        for model, opt in ((ref, golore), (rso, inner)):
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()  # for `inner`, the controller merges after every `gap` steps
        basis = golore.state[ref[0].weight]["basis"]  # the same key gives the same subspace
        torch.testing.assert_close(P, basis.T)
        torch.testing.assert_close(layer.weight + layer.B @ layer.projection.P, ref[0].weight, atol=1e-5, rtol=1e-5)
    assert ctl.outer_step == 3
    assert (ref[0].weight - start).abs().max() > 1e-2  # 1000x the tolerance: the comparison is not vacuous


def _rso_run(steps, *, resume_at=None, eta=0.5, gap=3):
    torch.manual_seed(0)
    model = apply_rso(nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24)), rank=4, seed=1)
    make_opt = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)  # noqa: E731
    opt = make_opt(model)
    ctl = RSOController(model, opt, update_gap=gap, eta=eta)
    batches = _batches(steps, 16)
    for i, batch in enumerate(batches):
        if i == resume_at:  # checkpoint (model + optimizer only) -> fresh objects -> load
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            model = apply_rso(nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24)), rank=4, seed=1)
            opt = make_opt(model)
            ctl = RSOController(model, opt, update_gap=gap, eta=eta)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    return model, opt, ctl


def test_controller_merges_resets_state_and_adds_proximal_gradient():
    torch.manual_seed(0)
    model = apply_rso(nn.Sequential(nn.Linear(16, 24)), rank=4)
    layer = model[0]
    opt = torch.optim.AdamW([layer.B, layer.bias], lr=1e-2)
    ctl = RSOController(model, opt, update_gap=2, eta=0.25)
    batches = _batches(4, 16)
    for i, batch in enumerate(batches):
        opt.zero_grad()
        _loss(model, batch).backward()
        grad, B = layer.B.grad.clone(), layer.B.detach().clone()
        opt.step()
        torch.testing.assert_close(layer.B.grad, grad + B / 0.25)  # ∇ of ‖B‖²/(2η), added before the step
        merged = i % 2 == 1
        assert (layer.B not in opt.state) == merged  # the subproblem restarts: B = 0, fresh Adam state
        assert layer.bias in opt.state  # other parameters keep theirs
        assert merged == (not layer.B.any())
    assert ctl.outer_step == 2 and ctl.steps == 4 and opt.state_dict()["param_groups"][0]["rso_step"] == 4
    ctl.remove()
    opt.step()
    assert ctl.steps == 4


def test_controller_resume_is_exact():
    straight, _, ctl = _rso_run(8)
    resumed, _, ctl2 = _rso_run(8, resume_at=4)  # mid-period: step 4 of gap 3
    assert ctl.outer_step == ctl2.outer_step == 2 and ctl.steps == ctl2.steps == 8
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_controller_does_not_count_skipped_steps():
    torch.manual_seed(0)
    model = apply_rso(nn.Sequential(nn.Linear(16, 24)), rank=4)
    opt = SubspaceSGD([p for p in model.parameters() if p.requires_grad], lr=0.1)  # dense: B is not a Linear
    ctl = RSOController(model, opt, update_gap=2)
    opt.zero_grad()
    _loss(model, _batches(1, 16)[0]).backward()
    model[0].B.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and ctl.steps == 0
