"""The per-group metadata cache never changes a result: tensors replaced or changed between
steps are read again, and nothing is kept past its use."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch

from rustadam import Adam, WeightDecay


def steps(opt: Adam, params: list[torch.Tensor], n: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def twin(backend_a: str = "rust", backend_b: str = "torch", **kw):
    torch.manual_seed(0)
    a = [torch.randn(3, 5), torch.randn(7)]
    b = [p.clone() for p in a]
    return a, Adam(a, backend=backend_a, **kw), b, Adam(b, backend=backend_b, **kw)


def test_cache_holds_params_and_states_but_never_grads():
    a, opt, _, _ = twin()
    steps(opt, a, 2)
    assert len(opt._core_caches[0]) == 3 * len(a)
    grad = a[0].grad
    ref = weakref.ref(grad)
    opt.zero_grad(set_to_none=True)
    del grad
    gc.collect()
    assert ref() is None, "a gradient outlived zero_grad()"


def test_replaced_state_is_read_again():
    a, oa, b, ob = twin()
    steps(oa, a, 2)
    steps(ob, b, 2)
    # New state tensors (other objects, other memory), as load_state_dict makes them.
    sd = copy.deepcopy(oa.state_dict())
    oa.load_state_dict(sd)
    steps(oa, a, 3, seed=1)
    steps(ob, b, 3, seed=1)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_param_data_replaced_by_another_dtype_is_not_stepped_as_the_old_one():
    a, opt, _, _ = twin()
    steps(opt, a, 1)
    a[0].data = a[0].data.double()  # the state stays float32: the core must notice
    a[0].grad = torch.randn(3, 5, dtype=torch.float64)
    a[1].grad = torch.randn(7)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        opt.step()


def test_param_transposed_in_place_is_an_error_not_a_wrong_step():
    a, opt, _, _ = twin(backend_a="auto")
    steps(opt, a, 1)
    a[0].data = a[0].data.t()  # same memory, same data pointer, other shape and strides
    a[0].grad = torch.randn(5, 3)
    a[1].grad = torch.randn(7)
    with pytest.raises(RuntimeError, match="exp_avg has shape"):
        opt.step()


def test_params_dropped_from_a_group_are_forgotten():
    a, opt, _, _ = twin()
    steps(opt, a, 1)
    a[1].grad = None
    a[0].grad = torch.randn(3, 5)
    opt.step()
    assert len(opt._core_caches[0]) == 3


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_copies_start_without_a_cache_and_match(copier):
    a, oa, b, ob = twin(weight_decay=WeightDecay(0.1))
    steps(oa, a, 2)
    steps(ob, b, 2)
    ob2 = copier(ob)
    oa2 = copier(oa)
    assert "_core_caches" not in oa2.__dict__
    pa = [p for g in oa2.param_groups for p in g["params"]]
    pb = [p for g in ob2.param_groups for p in g["params"]]
    steps(oa2, pa, 2, seed=5)
    steps(ob2, pb, 2, seed=5)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
