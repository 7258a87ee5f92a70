"""Model invariants: the Q/K policy, parameter arithmetic, causality."""

import pytest
import torch

from oelm_ray.core.config import ModelConfig
from oelm_ray.core.model import GPT

SMALL = dict(vocab_size=61, n_layer=3, n_head=4, d_model=32, d_ff=64, block_size=16)


def make(method="baseline", **kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**SMALL, "method": method, **kw}))


def test_oelm_freeze_is_orthogonal_per_head_and_not_globally():
    m = make("oelm_freeze")
    d, hs = m.cfg.d_model, m.cfg.d_model // m.cfg.n_head
    for block in m.transformer.h:
        w = block.attn.c_qk.weight.detach().double()
        for start in range(0, 2 * d, hs):
            head = w[start : start + hs]  # (hs, d): one head's slice of W_q or W_k
            torch.testing.assert_close(head @ head.T, torch.eye(hs, dtype=torch.float64), atol=1e-5, rtol=0)
        # independent draws: rows of different heads are not orthogonal to each other
        assert (w[:hs] @ w[hs : 2 * hs].T).abs().max() > 1e-3


def test_oelm_random_uses_configured_scale():
    m = make("oelm_random", qk_random_std=0.5, d_model=128, n_head=4)
    w = m.transformer.h[0].attn.c_qk.weight
    assert abs(w.std().item() - 0.5) < 0.05


def test_frozen_qk_are_not_trainable_and_counted():
    base, frozen = make("baseline"), make("oelm_freeze")
    n_qk = sum(p.numel() for p in frozen.qk_params().values())
    assert base.num_params() == frozen.num_params()
    assert base.num_params(trainable_only=True) - frozen.num_params(trainable_only=True) == n_qk
    assert n_qk == SMALL["n_layer"] * 2 * SMALL["d_model"] ** 2
    assert frozen.frozen_param_names() == list(frozen.qk_params())
    assert base.frozen_param_names() == []


def test_partial_freeze_lower_layers_only():
    m = make("oelm_freeze", qk_freeze_layers=2)
    assert [p.requires_grad for p in m.qk_params().values()] == [False, False, True]
    m.set_qk_trainable(True)
    assert all(p.requires_grad for p in m.qk_params().values())


def test_frozen_weights_get_no_gradient_work():
    m = make("oelm_freeze")
    x = torch.randint(0, SMALL["vocab_size"], (2, 8))
    _, loss = m(x, x)
    loss.backward()
    assert all(p.grad is None for p in m.qk_params().values())
    assert m.transformer.h[0].attn.c_v.weight.grad is not None


@pytest.mark.parametrize("method", ["baseline", "oelm_freeze", "oelm_random"])
def test_causal_later_tokens_do_not_change_earlier_predictions(method):
    m = make(method).eval()
    x = torch.randint(0, SMALL["vocab_size"], (1, 12))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % SMALL["vocab_size"]
    la, lb = m(x)[0], m(y)[0]
    torch.testing.assert_close(la[0, :7], lb[0, :7])
    assert not torch.allclose(la[0, 7:], lb[0, 7:])


def test_same_seed_same_init_and_methods_share_everything_but_qk():
    a, b = make("baseline"), make("oelm_freeze")
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        same = torch.equal(sa[name], sb[name])
        assert same != (".c_qk." in name), name


@pytest.mark.parametrize(
    "method, trainable, frozen",
    [("baseline", 44_896_768, 0), ("oelm_freeze", 41_751_040, 3_145_728), ("oelm_random", 41_751_040, 3_145_728)],
)
def test_medium_512_parameter_counts_are_the_research_s(method, trainable, frozen):
    from oelm_ray.core.config import make_config

    with torch.device("meta"):  # counts only: no 45M-parameter init
        m = GPT(make_config("medium-512", method=method).model)
    assert m.param_counts() == {"total": 44_896_768, "trainable": trainable, "frozen": frozen}


@pytest.mark.parametrize(
    "preset, total, frozen", [("small-256", 16_152_320, 524_288), ("large-768", 124_009_728, 14_155_776)]
)
def test_the_scaling_presets_parameter_counts(preset, total, frozen):
    """The sizes beside Medium-512: d_model 256 / 4 blocks, and GPT-2 small's 768 / 12 blocks / 12 heads (context 512)."""
    from oelm_ray.core.config import make_config

    for method, fro in (("baseline", 0), ("oelm_freeze", frozen)):
        with torch.device("meta"):
            m = GPT(make_config(preset, method=method).model)
        assert m.param_counts() == {"total": total, "trainable": total - fro, "frozen": fro}
    c = make_config(preset).model  # Q/K of every block: 2 d^2 each
    assert frozen == c.n_layer * 2 * c.d_model**2 and c.d_ff == 4 * c.d_model and c.block_size == 512


def test_mlp_has_zero_init_biases_and_dropout_after_the_gelu():
    m = make(dropout=0.5)
    mlp = m.transformer.h[0].mlp
    assert torch.equal(mlp.c_fc.bias, torch.zeros_like(mlp.c_fc.bias))
    assert torch.equal(mlp.c_proj.bias, torch.zeros_like(mlp.c_proj.bias))
    assert mlp.c_fc.bias.requires_grad and mlp.c_proj.bias.requires_grad
    seen = []
    mlp.c_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.randint(0, SMALL["vocab_size"], (4, 16))
    m.train()(x)
    m.eval()(x)
    dropped, kept = (h.eq(0).float().mean().item() for h in seen)
    assert kept < 0.01 and 0.4 < dropped < 0.6  # half the GELU outputs are dropped in training only


def test_scale_matched_random_std_is_one_over_sqrt_d_model():
    m = make("oelm_random", qk_random_std=0.0, d_model=256, n_head=4)
    assert m.cfg.qk_std == 256**-0.5
    w = m.transformer.h[0].attn.c_qk.weight
    assert abs(w.std().item() - 256**-0.5) < 0.003
