"""The torch.library ops: opcheck on gmpo_ext::loss_fwd / loss_bwd, and
torch.compile(fullgraph=True) of gmpo_loss / grpo_loss, forward and backward,
equal to eager. Compile tests are few: inductor on CPU takes seconds each."""

from __future__ import annotations

import pytest
import torch

import gmpo_ext
from gmpo_ext import _backend

from _helpers import make_case

pytestmark = pytest.mark.usefixtures("backend")

ALGO = {"gmpo": _backend.ALGO_GMPO, "grpo": _backend.ALGO_GRPO}


def _fwd_args(case, algo, convention=0, loss_type=0, eps=(0.4, 0.4), beta=0.0, clamp=0.0,
              normalizer=1.0, denom=0.0, device="cpu", requires_grad=True):
    lp = case.logps.to(device).detach().requires_grad_(requires_grad)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (lp, dev(case.old_logps), dev(case.advantages), dev(case.mask),
            dev(case.ref_logps) if beta != 0 else None, dev(case.is_weights),
            ALGO[algo], convention, loss_type, eps[0], eps[1], beta, clamp, normalizer, denom)


ARG_SETS = {
    "gmpo-trl-fp32": dict(algo="gmpo", mk=dict(B=3, T=17)),
    "gmpo-verl-bf16-token-adv-beta-isw": dict(
        algo="gmpo", convention=1, beta=0.05, clamp=20.0,
        mk=dict(B=4, T=9, dtype=torch.bfloat16, adv_shape="BT", ref=True, is_weights="BT")),
    "gmpo-trl-fp64-row-isw": dict(algo="gmpo", normalizer=2.0,
                                  mk=dict(B=2, T=5, dtype=torch.float64, is_weights="B",
                                          mask_kind="float")),
    "grpo-dapo-fp16": dict(algo="grpo", loss_type=3, eps=(0.2, 0.28), denom=30.0,
                           mk=dict(B=3, T=11, dtype=torch.float16, mask_kind="int")),
    "grpo-grpo-fp32-beta": dict(algo="grpo", loss_type=0, eps=(0.2, 0.2), beta=0.1,
                                mk=dict(B=5, T=7, ref=True, adv_shape="B1", is_weights="BT")),
    "gmpo-trl-B0": dict(algo="gmpo", mk=dict(B=0, T=4)),
}


def _build(name, device, requires_grad=True):
    spec = dict(ARG_SETS[name])
    mk = dict(spec.pop("mk"))
    algo = spec.pop("algo")
    B = mk.pop("B")
    T = mk.pop("T")
    case = make_case(B, T, seed=7, **mk) if B else _empty_case(T)
    return _fwd_args(case, algo, device=device, requires_grad=requires_grad, **spec)


def _empty_case(T):
    from _helpers import Case
    z = torch.zeros(0, T)
    return Case(z, z, torch.zeros(0), torch.zeros(0, T, dtype=torch.bool))


@pytest.mark.parametrize("name", list(ARG_SETS))
def test_opcheck_loss_fwd(name, device):
    args = _build(name, device)
    torch.library.opcheck(torch.ops.gmpo_ext.loss_fwd.default, args)


@pytest.mark.parametrize("name", list(ARG_SETS))
def test_opcheck_loss_bwd(name, device):
    args = _build(name, device, requires_grad=False)
    _, _, rows = torch.ops.gmpo_ext.loss_fwd(*args)
    out_dtype = torch.float64 if args[0].dtype == torch.float64 else torch.float32
    grad_loss = torch.tensor(0.37, dtype=out_dtype, device=device)
    torch.library.opcheck(torch.ops.gmpo_ext.loss_bwd.default, (grad_loss, rows) + args)


def test_ops_outputs_and_fake_shapes(device):
    args = _build("gmpo-verl-bf16-token-adv-beta-isw", device)
    loss, metrics, rows = torch.ops.gmpo_ext.loss_fwd(*args)
    B = args[0].shape[0]
    assert loss.shape == () and metrics.shape == (_backend.METRICS,)
    assert rows.shape == (B + 1, _backend.ROW_STATS) and rows.dtype == torch.float64
    assert loss.dtype == torch.float32 and metrics.dtype == torch.float32
    from torch._subclasses.fake_tensor import FakeTensorMode
    gl = loss.detach()
    with FakeTensorMode() as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        floss, fmetrics, frows = torch.ops.gmpo_ext.loss_fwd(*fargs)
        assert (floss.shape, fmetrics.shape, frows.shape) == (loss.shape, metrics.shape, rows.shape)
        assert (floss.dtype, fmetrics.dtype, frows.dtype) == (loss.dtype, metrics.dtype, rows.dtype)
        g = torch.ops.gmpo_ext.loss_bwd(mode.from_tensor(gl), frows, *fargs)
        assert g.shape == args[0].shape and g.dtype == args[0].dtype


# ----------------------------------------------------------------------------
# torch.compile(fullgraph=True): forward + backward, no graph break, equal to eager

def _gmpo_step(lp, old, adv, mask, ref):
    loss, metrics = gmpo_ext.gmpo_loss(lp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28,
                                       beta=0.04, ref_logps=ref, convention="trl",
                                       return_metrics=True)
    return loss * 0.37, metrics["clip_ratio/region_mean"], metrics["gmpo/nonfinite_rows"]


def _grpo_step(lp, old, adv, mask, ref):
    loss = gmpo_ext.grpo_loss(lp, old, adv, mask, loss_type="bnpo", beta=0.04, ref_logps=ref)
    return loss * 0.37, loss.detach(), loss.detach()


@pytest.mark.slow
@pytest.mark.parametrize("step", [_gmpo_step, _grpo_step], ids=["gmpo", "grpo"])
def test_compile_fullgraph_forward_backward_equals_eager(step, device):
    torch._dynamo.reset()
    case = make_case(4, 33, seed=8, ref=True)
    args = [t.to(device) for t in (case.old_logps, case.advantages, case.mask, case.ref_logps)]
    compiled = torch.compile(step, fullgraph=True)
    outs = []
    for fn in (step, compiled):
        lp = case.logps.to(device).detach().requires_grad_(True)
        loss, m1, m2 = fn(lp, *args)
        loss.backward()
        outs.append((loss.detach(), m1, m2, lp.grad))
    for e, c in zip(outs[0], outs[1]):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
    assert (outs[1][3] != 0).any()


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
def test_compile_module_with_changing_batch(dynamic, device):
    """GMPOLoss compiled, three batch sizes (automatic dynamic shapes recompile once
    with a symbolic B; dynamic=True starts symbolic), no graph break, equal to eager."""
    torch._dynamo.reset()
    mod = gmpo_ext.GMPOLoss(convention="verl")
    compiled = torch.compile(mod, fullgraph=True, dynamic=dynamic)
    for B in (3, 5, 7):
        case = make_case(B, 21, seed=9 + B, adv_shape="BT")
        grads = []
        for fn in (mod, compiled):
            lp = case.logps.to(device).detach().requires_grad_(True)
            fn(lp, case.old_logps.to(device), case.advantages.to(device),
               case.mask.to(device)).backward()
            grads.append(lp.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------
# the eager fast path and the op path must agree on what they refuse or record

def _small(dtype=torch.float64):
    torch.manual_seed(3)
    lp = (torch.randn(2, 5, dtype=dtype) * 0.1 - 1).requires_grad_()
    old = lp.detach() + 0.05 * torch.randn(2, 5, dtype=dtype)
    return lp, old, torch.tensor([0.7, -1.2]), torch.ones(2, 5, dtype=torch.bool)


def test_double_backward_raises_instead_of_returning_zeros():
    lp, old, adv, m = _small()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.functional.hessian(lambda x: gmpo_ext.gmpo_loss(x, old, adv, m), lp)


def test_make_fx_records_the_custom_op():
    from torch.fx.experimental.proxy_tensor import make_fx
    lp, old, adv, m = _small()
    gm = make_fx(lambda a, b, c, d: gmpo_ext.gmpo_loss(a, b, c, d))(lp.detach(), old, adv, m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.gmpo_ext.loss_fwd.default in targets
    lp2, old2, adv2, m2 = _small()
    old2 = old2 + 0.3
    torch.testing.assert_close(gm(lp2.detach(), old2, adv2, m2),
                               gmpo_ext.gmpo_loss(lp2.detach(), old2, adv2, m2))


def test_num_items_in_batch_tensor_divides_on_device_and_compiles():
    lp, old, adv, m = _small(torch.float32)
    n = torch.tensor(7.0)
    eager = gmpo_ext.grpo_loss(lp, old, adv, m, num_items_in_batch=n)
    as_float = gmpo_ext.grpo_loss(lp, old, adv, m, num_items_in_batch=7.0)
    torch.testing.assert_close(eager, as_float)
    (g_eager,) = torch.autograd.grad(eager, lp)
    (g_float,) = torch.autograd.grad(as_float, lp)
    torch.testing.assert_close(g_eager, g_float)
    torch._dynamo.reset()
    f = torch.compile(lambda x: gmpo_ext.grpo_loss(x, old, adv, m, num_items_in_batch=n),
                      fullgraph=True)
    torch.testing.assert_close(f(lp), as_float)


def test_constant_inputs_that_require_grad_are_reported():
    import gmpo_ext.loss as L
    lp, old, adv, m = _small()
    L._warned_constant_grads = False
    with pytest.warns(UserWarning, match="old_logps"):
        gmpo_ext.gmpo_loss(lp, old.clone().requires_grad_(), adv, m)


def test_op_modules_keep_real_annotations():
    """The modules that define custom ops must not use `from __future__ import
    annotations`: torch 2.4's custom_op (the floor) cannot infer a schema from
    string annotations, and `import gmpo_ext` failed there (2.13 accepts them,
    so only this check would notice it here)."""
    import __future__

    from gmpo_ext import hidden, logits, ops
    for mod in (ops, logits, hidden):
        assert not isinstance(getattr(mod, "annotations", None), __future__._Feature), \
            f"{mod.__name__} imports annotations from __future__"
