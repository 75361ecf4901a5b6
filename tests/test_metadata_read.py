"""The glue reads a tensor's layout in one C call where torch offers DLPack's exchange API, and
through its Python attributes otherwise (``RUSTADAM_NO_DLPACK=1`` forces the latter). Both reads
must give the same step and the same refusals, for every dtype, layout and odd tensor.
"""

from __future__ import annotations

import json

from _attacks import run_case

# Steps each case once with the Rust core; prints, per case, the result's bytes or the refusal.
_SCRIPT = r"""
import hashlib, json, torch
from rustadam import Adam, WeightDecay

def base(dtype, *shape):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(shape, generator=g, dtype=torch.float64))
    return x.to(dtype)

def layouts(dtype):
    yield "contiguous", base(dtype, 3, 4)
    yield "0-dim", base(dtype)
    yield "empty", base(dtype, 0, 3)
    yield "transposed", base(dtype, 4, 3).t()
    yield "sliced", base(dtype, 3, 8)[:, 1::2]
    yield "offset", base(dtype, 20)[5:11]
    yield "channels_last", base(dtype, 2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    yield "size1_strides", base(dtype, 1, 6).as_strided((1, 6), (97, 1))

def refused():
    yield "neg", base(torch.float32, 4)._neg_view()
    yield "conj", base(torch.complex64, 4).conj()
    yield "sparse", base(torch.float32, 4).to_sparse()
    yield "meta", torch.empty(4, device="meta")
    yield "int", torch.arange(4)
    yield "bool", torch.ones(4, dtype=torch.bool)
    yield "float8", torch.zeros(4, dtype=torch.float8_e4m3fn)

def digest(t):
    t = t.detach()
    if t.dtype.is_complex:
        t = torch.view_as_real(t)
    return hashlib.sha256(t.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
                          if t.numel() else b"").hexdigest()

def one(p, grad_of=None, moment=None):
    p.requires_grad_(p.dtype.is_floating_point or p.dtype.is_complex)
    p.grad = grad_of(p) if grad_of else torch.ones_like(p)
    opt = Adam([p], lr=0.1, weight_decay=WeightDecay(0.1), backend="rust")
    try:
        opt.step()
        if moment is not None:
            opt.state[p]["exp_avg"] = moment
        opt.step()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return digest(p) + " " + digest(opt.state[p]["exp_avg_sq"])

out = {}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64,
              torch.complex128):
    for name, p in layouts(dtype):
        out[f"{dtype} {name}"] = one(p)
for name, p in refused():
    try:
        out[name] = one(p)
    except Exception as e:  # refused before the optimizer (requires_grad on an int tensor)
        out[name] = f"{type(e).__name__}: {e}"
# A moment of another layout or shape than its parameter; a gradient of another layout.
p = base(torch.float32, 4, 3)
out["moment shape"] = one(p.clone(), moment=torch.zeros(3, 4))
out["moment dtype"] = one(p.clone(), moment=torch.zeros(4, 3, dtype=torch.float64))
out["moment expanded"] = one(p.clone(), moment=torch.zeros(1, 3).expand(4, 3))
out["moment transposed"] = one(p.clone(), moment=torch.zeros(3, 4).t())
out["grad transposed"] = one(p.clone(), lambda q: torch.ones(3, 4).t())
print(json.dumps(out))
"""


def _run(no_dlpack: bool) -> dict[str, str]:
    env = {"RUSTADAM_NO_DLPACK": "1"} if no_dlpack else {}
    return json.loads(run_case(_SCRIPT, env=env, prelude=False).strip().splitlines()[-1])


def test_both_metadata_reads_give_the_same_steps_and_refusals():
    fast, slow = _run(False), _run(True)
    assert fast.keys() == slow.keys()
    for case in fast:
        assert fast[case] == slow[case], (case, fast[case], slow[case])
    # The battery steps real tensors and refuses the odd ones (it would pass vacuously otherwise).
    stepped = [c for c, r in fast.items() if not r.startswith(("TypeError", "RuntimeError",
                                                               "ValueError"))]  # fmt: skip
    assert len(stepped) >= 40, fast
    for case in (
        "neg",
        "conj",
        "sparse",
        "meta",
        "float8",
        "moment shape",
        "moment dtype",
        "moment expanded",
    ):
        assert ":" in fast[case] and len(fast[case].split()[0]) < 40, (case, fast[case])


# Python code that redirects torch's methods: the core must read torch's own getters, so a lie
# can neither move its writes nor widen its bounds check. ``buf[n:]`` sits right after the
# parameter ``buf[:n]`` in one storage: a write placed by a lying data_ptr() or checked against
# a lying storage size lands there.
_LIES = r"""
import torch
from rustadam import Adam

n = 1024
buf = torch.zeros(2 * n)
p = buf[:n]
p.grad = torch.ones(n)
opt = Adam([p], lr=0.5, backend="rust")
real_ptr = torch.Tensor.data_ptr
lies = {
    "data_ptr": lambda self: real_ptr(self) + 4 * n,
    "stride": lambda self, *a: (1,) * self.dim(),
    "storage_offset": lambda self: n,
}
for name, lie in lies.items():
    setattr(torch.Tensor, name, lie)
torch.UntypedStorage.__len__ = lambda self: 1 << 40
torch.UntypedStorage.nbytes = lambda self: 1 << 40
try:
    opt.step()
    outcome = "stepped"
except Exception as e:
    outcome = f"{type(e).__name__}: {e}"
for name in lies:
    delattr(torch.Tensor, name)
del torch.UntypedStorage.__len__, torch.UntypedStorage.nbytes
print(outcome)
print(float(buf[:n].min()), float(buf[:n].max()), float(buf[n:].abs().max()))
"""


def test_redirected_torch_methods_cannot_move_or_widen_the_cores_writes():
    for env in ({}, {"RUSTADAM_NO_DLPACK": "1"}):
        out = run_case(_LIES, env=env, prelude=False).strip().splitlines()
        assert out[0] == "stepped", (env, out)
        low, high, beyond = map(float, out[1].split())
        # First Adam step from zero with gradient one: every element moves by -lr exactly
        # (m_hat = 1, v_hat = 1; eps only perturbs the last digits).
        assert abs(low + 0.5) < 1e-6 and abs(high + 0.5) < 1e-6, (env, out)
        assert beyond == 0.0, (env, out)
