"""`optim.name: muon`: the Muon rule against torch.optim.Muon, the AdamW rule against torch.optim.AdamW,
which parameters take which rule, and the launches that cannot use it (the demo recipe trains with it:
its end-to-end and SIGKILL-resume tests in test_train.py run Muon)."""

import copy

import pytest
import torch

from train.config import ConfigError, load_config
from train.optim import MuonAdamW, orthogonalize, wants_muon
from train.parts import param_groups


def test_orthogonalize_flattens_the_spectrum_and_keeps_the_singular_vectors():
    torch.manual_seed(0)
    for shape in [(32, 80), (80, 32)]:
        g = torch.randn(*shape) @ torch.diag(torch.logspace(-1, 1, shape[1]))  # spread 100x
        o = orthogonalize(g)
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.3, s  # every direction moves at about the same rate
        assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 20
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        cos = torch.nn.functional.cosine_similarity(o.flatten(), (u @ vh).flatten(), 0)
        assert cos > 0.95
    stack = torch.randn(3, 16, 40)
    torch.testing.assert_close(orthogonalize(stack), torch.stack([orthogonalize(m) for m in stack]))


def _step_both(ref, mine, o_ref, o_mine):
    """One step of each optimizer on the same random gradients."""
    for a, b in zip(ref, mine):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
    o_ref.step()
    o_mine.step()


def test_muon_groups_step_like_torch_muon_with_adamw_matched_scale():
    torch.manual_seed(0)
    ws = [torch.randn(48, 96), torch.randn(48, 96), torch.randn(96, 32)]  # a stack of two, and a tall one
    ref = [torch.nn.Parameter(w.clone()) for w in ws]
    mine = [torch.nn.Parameter(w.clone()) for w in ws]
    o_ref = torch.optim.Muon(ref, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    o_mine = MuonAdamW([{"params": mine, "muon": True, "weight_decay": 0.1}], lr=0.01)
    for _ in range(4):
        _step_both(ref, mine, o_ref, o_mine)
        for w, a, b in zip(ws, ref, mine):
            moved_ref, moved_mine = a.detach() - w, b.detach() - w
            # torch runs Newton-Schulz in bf16, mine in fp32: ~1% apart
            assert (moved_ref - moved_mine).norm() / moved_ref.norm() < 0.03


def test_adamw_groups_step_exactly_like_torch_adamw():
    torch.manual_seed(0)
    ps = [torch.randn(16, 8), torch.randn(8)]
    ref = [torch.nn.Parameter(p.clone()) for p in ps]
    mine = [torch.nn.Parameter(p.clone()) for p in ps]
    o_ref = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": 0.05}, {"params": [ref[1]], "weight_decay": 0.0}],
                              lr=3e-3, betas=(0.9, 0.98), eps=1e-8)
    o_mine = MuonAdamW([{"params": [mine[0]], "weight_decay": 0.05}, {"params": [mine[1]], "weight_decay": 0.0}],
                       lr=3e-3, betas=(0.9, 0.98), eps=1e-8)
    for _ in range(5):
        _step_both(ref, mine, o_ref, o_mine)
    for a, b in zip(ref, mine):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_param_groups_put_hidden_matrices_on_muon_and_the_rest_on_adamw():
    from mmgpt import build_model
    from mmgpt.config import MMGPTConfig

    model, _ = build_model(MMGPTConfig.from_preset("tiny", vision={"stem": "cnn"}),
                           texts=["a small red circle", "what colour is the circle? red"])
    cfg = load_config(None, ["optim.name=muon", "optim.muon_lr=0.02", "optim.lr=1e-3"])
    groups = param_groups(model, cfg)
    on_muon = {id(p) for g in groups if g["muon"] for p in g["params"]}
    assert all(g["lr"] == (0.02 if g["muon"] else 1e-3) for g in groups)
    names = {n: id(p) in on_muon for n, p in model.named_parameters()}
    assert names["decoder.transformer.h.0.attn.c_attn.weight"] and names["vision.model.layers.0.mlp.fc1.weight"]
    assert names["decoder.transformer.h.0.crossattention.q_attn.weight"] and names["adapter.fc1.weight"]
    assert not names["decoder.transformer.wte.weight"] and not names["decoder.transformer.wpe.weight"]
    assert not names["vision.model.embeddings.position_embeddings"] and not names["logit_scale"]
    assert not any(on for n, on in names.items() if n.endswith("bias") or "ln" in n or "layernorm" in n)
    first_conv = "vision.model.embeddings.patch_embeddings.projection.layers.0.weight"
    assert not names[first_conv] and wants_muon("conv2.weight", torch.empty(64, 32, 3, 3))
    with pytest.raises(ConfigError, match="optim.name: 'lion'.*'adamw' or 'muon'"):
        load_config(None, ["optim.name=lion"])


def test_state_dict_round_trip_continues_the_same_trajectory():
    """What `accelerator.save_state` / `load_state` rely on: a reloaded optimizer steps like the original."""
    torch.manual_seed(0)
    w = [torch.randn(24, 40), torch.randn(24, 40), torch.randn(40)]

    def make(ps):
        return MuonAdamW([{"params": ps[:2], "muon": True, "weight_decay": 0.1},
                          {"params": ps[2:], "weight_decay": 0.0}], lr=0.01)

    grads = [[torch.randn_like(x) for x in w] for _ in range(6)]
    a = [torch.nn.Parameter(x.clone()) for x in w]
    opt_a = make(a)
    for step in range(6):
        for p, g in zip(a, grads[step]):
            p.grad = g.clone()
        opt_a.step()
        if step == 2:
            saved = ([p.detach().clone() for p in a], copy.deepcopy(opt_a.state_dict()))
    b = [torch.nn.Parameter(x.clone()) for x in saved[0]]
    opt_b = make(b)
    opt_b.load_state_dict(saved[1])
    for step in range(3, 6):
        for p, g in zip(b, grads[step]):
            p.grad = g.clone()
        opt_b.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_muon_is_refused_where_the_launch_shards_the_matrices(tmp_path, kind):
    import types

    from accelerate.utils import DistributedType

    from train.loop import TrainingError, run_training

    cfg = load_config(None, ["optim.name=muon", f"output_dir={tmp_path}"])
    sharded = types.SimpleNamespace(distributed_type=DistributedType[kind])
    with pytest.raises(TrainingError, match=f"{kind} shards them.*optim.name=adamw"):
        run_training(cfg, accelerator=sharded)
