"""A stateful property test: sequences of steps, zero_grad, `.data` surgery, state
replacement, added and removed groups and loaded state dicts, on a rustadam Adam and on a
``backend="torch"`` twin over identical float32 parameters; after every step both agree with each
other and with the float64 oracle (one step from the state before it), and after every refused
operation nothing changed. RUSTADAM_PROPERTY_EXAMPLES scales it up."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from _attacks import assert_unchanged, snapshot
from oracle import decay, update
from rustadam import Adam, WeightDecay

EXAMPLES = int(os.environ.get("RUSTADAM_PROPERTY_EXAMPLES", "12"))
LR, BETAS, EPS, WD = 0.01, (0.9, 0.999), 1e-8, 0.05


def make_params(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(12, generator=gen)
    return [
        torch.randn(4, 4, generator=gen),  # square: transposed in place
        torch.randn(6, generator=gen),  # shrunk
        torch.randn(3, 5, generator=gen),
        base[::2],  # non-dense view, same shape as the second: swapped with it
    ]


def params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


class AdamMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.backend = "auto"
        self.a = make_params(0)
        self.b = make_params(0)
        self.opt = Adam(self.a, lr=LR, eps=EPS, weight_decay=WeightDecay(WD), backend="auto")
        self.twin = Adam(self.b, lr=LR, eps=EPS, weight_decay=WeightDecay(WD), backend="torch")
        self.saved = None
        self.extra = 0

    # ---- helpers -------------------------------------------------------------------------------

    def both(self, fn):
        """Applies ``fn(opt, params)`` to both; a refusal must change nothing; returns errors."""
        errors = []
        for opt in (self.opt, self.twin):
            snap = snapshot(opt)
            try:
                fn(opt, params_of(opt))
                errors.append(None)
            except (RuntimeError, ValueError) as e:
                assert "PanicException" not in type(e).__name__
                assert_unchanged(opt, snap, f"{type(e).__name__}: {e}")
                errors.append(e)
        if (errors[0] is None) != (errors[1] is None):
            self.resync()  # the twin follows rustadam where only one of them refused
        return errors

    def resync(self):
        self.twin.param_groups = []
        self.twin.state.clear()
        for g in self.opt.param_groups:
            qs = []
            for p in g["params"]:
                q = p.detach().clone()
                if p.grad is not None:
                    q.grad = p.grad.clone()
                qs.append(q)
                s = self.opt.state.get(p)
                if s:
                    self.twin.state[q] = {
                        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()
                    }
            self.twin.param_groups.append(dict(g, params=qs))

    def expected(self):
        """The oracle's result of one step from the current state, per parameter (or None)."""
        out = []
        for g in self.opt.param_groups:
            for p in g["params"]:
                s = self.opt.state.get(p) or {}
                if p.grad is None or p.grad.shape != p.shape:
                    out.append(None)
                    continue
                m = s.get("exp_avg", torch.zeros_like(p)).double().numpy()
                v = s.get("exp_avg_sq", torch.zeros_like(p)).double().numpy()
                if m.shape != tuple(p.shape) or v.shape != tuple(p.shape):
                    out.append(None)
                    continue
                grp = {"lr": g["lr"], "weight_decay": g["weight_decay"]}
                th, gr = decay(p.double().numpy(), p.grad.double().numpy(), grp, True, False)
                b1, b2 = g["betas"]
                m = b1 * m + (1 - b1) * gr
                v = b2 * v + (1 - b2) * gr * gr
                t = s.get("step", 0) + 1
                out.append(update(th, m, v, t, g["lr"], g["betas"], g["eps"], True))
        return out

    # ---- rules ---------------------------------------------------------------------------------

    @rule(seed=st.integers(0, 2**16), nones=st.lists(st.booleans(), min_size=8, max_size=8))
    def step(self, seed, nones):
        for ps in (params_of(self.opt), params_of(self.twin)):
            gen = torch.Generator().manual_seed(seed)
            for i, p in enumerate(ps):
                g = torch.randn(p.shape, generator=gen)
                if nones[i % 8]:
                    continue
                if p.grad is not None and p.grad.shape != p.shape:
                    continue  # keep a stale gradient: the step must refuse it
                p.grad = g
        want = self.expected()
        errors = self.both(lambda opt, ps: opt.step())
        if errors[0] is not None:
            return
        for p, e in zip(params_of(self.opt), want):
            if e is not None:
                np.testing.assert_allclose(p.double().numpy(), e, rtol=1e-4, atol=1e-5)
        if errors[1] is not None:
            return
        for p, q in zip(params_of(self.opt), params_of(self.twin)):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
            sp, sq = self.opt.state.get(p, {}), self.twin.state.get(q, {})
            assert sp.get("step") == sq.get("step")
            for k in ("exp_avg", "exp_avg_sq"):
                if k in sp:
                    torch.testing.assert_close(sp[k], sq[k], rtol=1e-6, atol=1e-7)

    @rule(none=st.booleans())
    def zero_grad(self, none):
        self.opt.zero_grad(set_to_none=none)
        self.twin.zero_grad(set_to_none=none)

    @rule()
    def transpose_square(self):
        for ps in (params_of(self.opt), params_of(self.twin)):
            ps[0].data = ps[0].data.t()

    @rule(n=st.integers(1, 5))
    def shrink(self, n):
        for ps in (params_of(self.opt), params_of(self.twin)):
            if ps[1].dim() == 1 and ps[1].shape[0] > n:
                ps[1].data = ps[1].data[:n]

    @rule()
    def swap_data(self):
        for ps in (params_of(self.opt), params_of(self.twin)):
            if ps[1].shape == ps[3].shape:
                ps[1].data, ps[3].data = ps[3].data, ps[1].data

    @rule()
    def repair(self):
        """Brings every parameter, gradient and state back to matching shapes."""
        for opt in (self.opt, self.twin):
            gen = torch.Generator().manual_seed(1)
            for p in params_of(opt):
                s = opt.state.get(p)
                shape = s["exp_avg"].shape if s else p.shape
                if p.shape != shape:
                    p.data = torch.randn(shape, generator=gen)
                if p.grad is not None and p.grad.shape != p.shape:
                    p.grad = None
                for k in ("exp_avg", "exp_avg_sq"):
                    if s and s[k].shape != p.shape:
                        s[k] = torch.zeros_like(p)

    @rule(
        which=st.integers(0, 7), key=st.sampled_from(["exp_avg", "exp_avg_sq"]), bad=st.booleans()
    )
    def replace_state(self, which, key, bad):
        for opt in (self.opt, self.twin):
            ps = params_of(opt)
            s = opt.state.get(ps[which % len(ps)])
            if s:
                s[key] = torch.zeros(s[key].numel() + 1) if bad else s[key].clone()

    @precondition(lambda self: len(self.opt.param_groups) < 3)
    @rule(n=st.integers(1, 9))
    def add_group(self, n):
        self.extra += 1
        for opt in (self.opt, self.twin):
            gen = torch.Generator().manual_seed(100 + self.extra)
            opt.add_param_group({"params": [torch.randn(n, generator=gen)], "lr": LR * 2})

    @precondition(lambda self: len(self.opt.param_groups) > 1)
    @rule()
    def remove_group(self):
        for opt in (self.opt, self.twin):
            for p in opt.param_groups.pop()["params"]:
                opt.state.pop(p, None)

    @rule()
    def save(self):
        self.saved = (copy.deepcopy(self.opt.state_dict()), copy.deepcopy(self.twin.state_dict()))

    @precondition(lambda self: self.saved is not None)
    @rule(corrupt=st.sampled_from([None, "missing", "shape"]))
    def load(self, corrupt):
        sds = [copy.deepcopy(sd) for sd in self.saved]
        if corrupt:
            for sd in sds:
                for entry in sd["state"].values():
                    if corrupt == "missing":
                        entry.pop("exp_avg_sq")
                    else:
                        entry["exp_avg"] = torch.zeros(entry["exp_avg"].numel() + 2)
        k = iter(range(2))
        errors = self.both(lambda opt, ps: opt.load_state_dict(sds[next(k)]))
        if corrupt and any(sd["state"] for sd in sds):
            assert errors[0] is not None, f"a state dict with {corrupt} was accepted"

    @invariant()
    def no_panic_and_finite(self):
        for p in params_of(self.opt):
            assert torch.isfinite(p).all()


AdamMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=20,
    derandomize=True,
    report_multiple_bugs=False,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestAdamMachine = AdamMachine.TestCase
