"""The fused AdamW kernel make_optimizer picks gives the same update as the plain per-parameter loop."""

import torch

from hdlm.config import load_config
from hdlm.optim import adamw_kernel, make_optimizer


def test_fused_adamw_equals_plain_adamw():
    tc = load_config(None, ["train.lr=0.01", "train.weight_decay=0.1", "train.warmup=2"]).train
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    plain_model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    plain_model.load_state_dict(fused_model.state_dict())
    fused, sched = make_optimizer(fused_model, tc)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(plain_model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                              foreach=False, fused=False)
    plain_sched = torch.optim.lr_scheduler.LambdaLR(plain, sched.lr_lambdas[0])
    for step in range(5):
        x = torch.randn(4, 5, dtype=torch.float64)
        for model, opt, sch in ((fused_model, fused, sched), (plain_model, plain, plain_sched)):
            model(x).pow(2).sum().backward()
            opt.step()
            sch.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.equal(fused_model[0].weight, torch.nn.Linear(5, 7).double().weight)


def test_adamw_kernel_choice():
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert adamw_kernel(cpu) == {"fused": True}
    assert adamw_kernel([torch.nn.Parameter(torch.zeros(2, device="meta"))]) == {}
