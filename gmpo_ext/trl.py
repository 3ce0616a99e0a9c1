"""GMPO and GRPO in TRL, fused: drop-in replacements for
``trl.experimental.gmpo.GMPOTrainer`` and ``trl.GRPOTrainer``.

    from gmpo_ext.trl import GMPOTrainer        # instead of trl.experimental.gmpo
    trainer = GMPOTrainer(model=..., reward_funcs=..., args=GMPOConfig(...), ...)
    from gmpo_ext.trl import GRPOTrainer        # instead of trl.GRPOTrainer

Both share the fused-head machinery described below (``_FusedHeadMixin``);
:class:`GRPOTrainer` computes TRL's GRPO-family loss with
:func:`gmpo_ext.grpo_loss` (see its docstring), the
rest of this text is about GMPOTrainer.

Everything but the loss is TRL's own (generation, rewards, advantages, weight
syncing, logging). The loss step:

* by default (``fused_lm_head=True``) never holds the (B, T, V) logits, as
  TRL's own fused head does: the trainer patches the model's ``forward`` (the
  PEFT base model's) to take ``gmpo_ext_head=``; called so through the wrapped
  model, the forward runs the model with ``logits_to_keep=1`` and
  ``output_hidden_states=True`` and then, still inside the forward of whatever
  wraps the model (DDP, FSDP1, FSDP2, DeepSpeed ZeRO-3, PEFT), the per-token
  log-probs and entropies from the last hidden states and the LM head with
  :func:`gmpo_ext.linear_logps` (token x vocabulary tiles; only the completion
  tokens the mask counts are projected). There the engines have unsharded the
  head (a ZeRO-3 head is gathered for the projection and again for its
  backward) and will reduce its gradient like every other parameter's. Under
  autocast the head's GEMMs run in the autocast dtype, as the model's own
  head does (fp32 with ``cast_lm_head_to_fp32``, as TRL). On the first batch
  the hidden states are checked against the model's own last-position logits
  (a tolerance from the rounding of the products and of the logits) and the
  ranks agree on the outcome; a model whose head is not a plain linear layer
  (+ the config's ``final_logit_softcapping``), that fails the check, or
  whose head is still sharded inside its forward uses the logits path below
  instead, with one warning naming the reason;
* the logits path (``fused_lm_head=False``, or the fallback): calls the model
  the way TRL's logits path does (``logits_to_keep = T + 1``,
  ``use_cache=False``, under the accelerator's autocast) and keeps the model's
  own (B, T + 1, V) logits tensor: no (B, T, V) log-softmax, no slice copy,
  and gets the per-token log-probs and entropies from it with
  :func:`gmpo_ext.selective_logps` (one fused read of the logits; the
  gradient is written back into the logits' buffer, one more read);
* the loss with :func:`gmpo_ext.gmpo_loss` (``convention="trl"``), after the
  log-probs because TRL's entropy mask needs the entropies before the loss;
* honours ``epsilon`` / ``epsilon_high`` (log space), ``beta`` (k3 KL to the
  reference log-probs), ``temperature``, ``top_entropy_quantile``, tool masks
  and gradient accumulation (``normalizer``) exactly as TRL's GMPOTrainer
  does, and logs the same metric names (``kl``, ``entropy``,
  ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
  ``clip_ratio/low_min``, ``clip_ratio/high_max``) with the same cross-process
  reductions, plus ``gmpo/log_ratio_min``, ``gmpo/log_ratio_max`` (the range of
  the per-token log importance ratio), ``gmpo/max_mean_log_ratio`` and
  ``gmpo/nonfinite_rows``.

Differences from TRL's GMPOTrainer, on purpose:

* The rollout engine's importance-sampling ratio (``importance_sampling_ratio``
  in the batch, present with ``use_vllm=True`` and
  ``vllm_importance_sampling_correction=True``) is applied; TRL's GMPO ignores
  it. It weights each row's policy term: a per-sequence ratio (the
  ``sequence_*`` modes, shape (B, 1)) multiplies the row as is; per-token
  ratios (``token_*`` modes, (B, T)) are combined per row as their geometric
  mean over the row's counted tokens, ``exp(mean log(w + 1e-10))`` (a token the
  ``token_mask`` mode zeroed pulls its row's weight towards 0). Pass
  ``rollout_is_correction=False`` to the constructor for TRL's behaviour.
* ``use_liger_kernel=True`` does not change the loss (older TRL releases
  silently trained Liger's GRPO loss with it).
* Top-entropy masking (``top_entropy_quantile < 1``) is applied to the
  geometric mean only, as TRL does: the KL term and the metrics use the plain
  completion (x tool) mask. Reproduced exactly.
* A masked token never enters the arithmetic, so NaN or inf in padding cannot
  poison a row (see :func:`gmpo_ext.gmpo_loss`).
* Options TRL's GMPOTrainer inherits from GRPOConfig but ignores are applied
  (each off unless set): ``entropy_coef`` / ``use_adaptive_entropy`` (TRL
  GRPOTrainer's entropy bonus and adaptive controller, on the tokens the
  geometric mean counts, with its ``policy_loss`` and ``entropy_coef``
  metrics); ``off_policy_mask_threshold`` (TRL GRPOTrainer's off-policy
  sequence mask: a dropped row's advantage is set to 0, so its policy term and
  gradient are exactly 0 while its KL term stays, as in TRL's GRPO); ``delta``
  (>= 1: each token's log-ratio capped at ``log(delta)`` before GMPO's clip,
  which for delta >= 1 is the same as capping the clipped value, ``y = min(y,
  log delta)``; the geometric-mean ratio is then at most ``delta``, the
  meaning TRL's GRPO gives delta per token; capped tokens get no gradient, the
  KL uses the uncapped log-probs). The MoE router's load-balancing loss is added with
  ``router_aux_loss=True`` (default False, as TRL's GMPOTrainer). If a batch
  must fall back to TRL's GMPO loss while one of these is set, the trainer
  raises instead of training without it.

Cases the fused path does not handle fall back to TRL's own ``_compute_loss``
(one warning each): vision-language inputs (``pixel_values`` and the other
image fields) and models whose ``forward`` takes no ``logits_to_keep``.

Supported TRL releases: see ``TRL_SUPPORTED`` (the range whose
``GMPOTrainer._compute_loss`` this module was checked against; the parity test
``tests/test_trl.py`` compares loss and every parameter gradient with TRL's own
trainer). Importing this module with another TRL release raises ImportError;
``GMPO_EXT_TRL_ANY_VERSION=1`` skips that check at your own risk.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import types
import warnings

import torch

TRL_SUPPORTED = (">=1.12.0", "<1.17")
_MIN, _MAX = "1.12.0", "1.17.0.dev0"
_INSTALL_HINT = 'pip install "gmpo_ext[trl]"  (or: pip install "trl>=1.12.0,<1.17")'


try:
    import trl as _trl
except ImportError as _e:  # pragma: no cover - exercised only without TRL
    raise ImportError(f"gmpo_ext.trl needs TRL {','.join(TRL_SUPPORTED)}, which is not "
                      f"installed ({_e}). Install it with: {_INSTALL_HINT}") from None

from packaging.version import Version  # noqa: E402  (a dependency of TRL)

TRL_VERSION = _trl.__version__
if not (Version(_MIN) <= Version(TRL_VERSION) < Version(_MAX)) and \
        os.environ.get("GMPO_EXT_TRL_ANY_VERSION", "") != "1":
    raise ImportError(
        f"gmpo_ext.trl supports TRL {','.join(TRL_SUPPORTED)} (the releases whose "
        f"experimental GMPOTrainer it reproduces), but TRL {TRL_VERSION} is installed. "
        f"Install a supported release with: {_INSTALL_HINT}; or set "
        "GMPO_EXT_TRL_ANY_VERSION=1 to try this one anyway.")

try:
    from trl.experimental.gmpo import GMPOConfig
    from trl.experimental.gmpo import GMPOTrainer as TRLGMPOTrainer
    from trl import GRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as _e:  # pragma: no cover - a supported release always has them
    raise ImportError(f"gmpo_ext.trl: TRL {TRL_VERSION} lacks trl.experimental.gmpo ({_e}); "
                      f"install a supported release: {_INSTALL_HINT}") from None

from . import _backend  # noqa: E402
from .loss import MAX_MEAN_LOG_RATIO, NONFINITE_ROWS, gmpo_loss, grpo_loss  # noqa: E402
from .logits import selective_logps  # noqa: E402
from . import hidden as _hidden  # noqa: E402
from .hidden import linear_logps  # noqa: E402

__all__ = ["GMPOTrainer", "GMPOConfig", "GRPOTrainer", "GRPOConfig", "TRL_SUPPORTED",
           "TRL_VERSION"]

LOG_RATIO_MIN = "gmpo/log_ratio_min"
LOG_RATIO_MAX = "gmpo/log_ratio_max"

# batch fields that only vision-language models send: the fused path falls back
# to TRL's computation when one of them is present
_VISION_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                "spatial_shapes", "num_tiles", "image_sizes", "mm_token_type_ids",
                "image_position_ids")


def _accepts(module, name):
    """Whether module.forward takes keyword ``name`` (explicitly or through **kwargs)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


class _HeadCall:
    """What the patched forward does with ``gmpo_ext_head=``: inside the wrapped
    model's forward, run the model's own forward for one position's logits and
    the hidden states, then the fused head on the completion's hidden states.

    On the first batch (``check``) the head is first checked against the
    model's own last-position logits, and the ranks agree on the outcome (one
    all-reduce of two flags): if the check fails on any rank, or the head is
    still sharded inside the forward, every rank sets ``why`` (the forward
    returns None and the trainer uses the logits path), so that no rank runs a
    second forward while another goes on to backward. ``conclusive`` is False
    when no rank had a finite logit to check against (the check runs again
    on the next batch)."""

    def __init__(self, trainer, T, completion_ids, mask, softcap, check, aux=False):
        self.trainer, self.T, self.ids, self.mask = trainer, T, completion_ids, mask
        self.softcap, self.check, self.why, self.conclusive = softcap, check, None, True
        self.aux = aux

    def __call__(self, module, forward, kwargs):
        scored = self._score(module, forward, kwargs)
        if scored is None or not self.aux:
            return scored
        return (*scored, self.aux_loss)

    def _score(self, module, forward, kwargs):
        T = self.T
        kwargs.update(logits_to_keep=1, use_cache=False, output_hidden_states=True)
        if self.aux:    # MoE: the router's load-balancing loss, from the model's own forward
            kwargs["output_router_logits"] = True
        out = forward(**kwargs)
        self.aux_loss = getattr(out, "aux_loss", None)
        hs = getattr(out, "hidden_states", None)
        if not hs or hs[-1].dim() != 3 or hs[-1].shape[1] < T + 1:
            self.why = "the model returns no (B, L, H) last hidden states"
            return None
        hs = hs[-1]
        head = module.get_output_embeddings()
        weight, bias = head.weight, head.bias
        fp32_head = bool(getattr(self.trainer.args, "cast_lm_head_to_fp32", False))
        with _hidden._zero3_gathered(weight, bias):
            try:    # still sharded inside the forward (an FSDP unit of its own): not fused
                _hidden._check_head_weight(weight, bias)
            except (TypeError, ValueError) as e:
                self.why = "the LM head's weight is sharded inside the model's forward (" + \
                    str(e).split(";")[0] + ")"
            if self.check:
                if self.why is None:
                    try:    # an error here must not leave the other ranks in _agree
                        self.why, self.conclusive = _head_mismatch(
                            hs[:, -1], weight, bias, self.softcap, out.logits[:, -1])
                    except (RuntimeError, ValueError, TypeError) as e:   # e.g. out of memory
                        self.why = f"the fused-head check raised {type(e).__name__}: {e}"
                self._agree(hs.device)
            if self.why is not None:
                return None
            h = hs[:, -(T + 1):-1]
            kw = dict(bias=bias, temperature=self.trainer.temperature,
                      final_logit_softcapping=self.softcap, return_entropy=True, mask=self.mask)
            if fp32_head:   # TRL's cast_lm_head_to_fp32: the head in fp32, outside autocast
                with torch.autocast(h.device.type, enabled=False):
                    kw["bias"] = None if bias is None else bias.float()
                    return linear_logps(h.float(), weight.float(), self.ids, **kw)
            if _hidden._autocast_dtype(h, weight, bias) is None and h.dtype != weight.dtype:
                h = h.to(weight.dtype)   # no autocast: the head's dtype, as its own forward
            return linear_logps(h, weight, self.ids, **kw)

    def _agree(self, device):
        """Every rank takes the same path: the check failed anywhere -> all fall
        back; inconclusive anywhere (and failed nowhere) -> all check again."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        flags = torch.tensor([float(self.why is not None), float(not self.conclusive)],
                             dtype=torch.float32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed, inconclusive = (bool(x) for x in flags.tolist())
        if failed and self.why is None:
            self.why = ("the fused-head check failed on another rank (each rank checks its "
                        "own first batch; see that rank's warning)")
        self.conclusive = not inconclusive


_CHECK_ROWS = 8192   # vocabulary rows per block of the head check (its memory: a few blocks)


@torch.no_grad()
def _head_mismatch(h, weight, bias, softcap, ref):
    """(why, conclusive): why is None when the LM head reproduces the model's
    logits ``ref`` (B, V) from its last hidden states ``h`` (B, H); conclusive
    is False when ``ref`` has no finite logit to check against (a NaN or inf
    logit says nothing about the head: such logits are left out).

    The projection is computed as the model's own head computed it: in the
    autocast dtype when autocast is on, else in the promotion of the hidden
    states' and the weight's dtypes, the product rounded to it, the transform
    in fp32. Both then differ only by rounding: of the product to its dtype
    and of the logits to theirs (a few units in the last place of |z|,
    whatever |z| is: trained models reach |z| ~ 50; a bf16 softcap adds two
    roundings on each side), and fp32 accumulation in another order (bounded
    by sqrt(H) u32 sum_k |h_k w_vk|): the tolerance is
    2 (u_product + u_logits) max(|y|, |z|) + 4 sqrt(H) u32 sum_k |h_k w_vk|
    per logit (bf16: 1.6% of |z|). A missing scale, a different hidden state
    or another head is off by a fraction of |z| itself. The vocabulary is
    checked _CHECK_ROWS rows at a time: no (V, H) copy of the head."""
    cd = _hidden._autocast_dtype(h, weight, bias) or torch.promote_types(h.dtype, weight.dtype)
    rd = ref.dtype
    u = _unit_roundoff(cd) + _unit_roundoff(rd)
    acc = 4 * math.sqrt(h.shape[-1]) * _unit_roundoff(torch.float32)
    hc = h.to(cd)
    ha = hc.float().abs()
    worst, finite_seen = None, False   # (err / tol, row, id, z, ref, tol)
    for v0 in range(0, weight.shape[0], _CHECK_ROWS):
        v1 = min(v0 + _CHECK_ROWS, weight.shape[0])
        wc = weight[v0:v1].to(cd)
        bc = None if bias is None else bias[v0:v1].to(cd)
        # the bias inside the GEMM, one rounding, as the model's F.linear (and the
        # fused head's addmm) add it: rounding h.w first and adding b after it is
        # off by u |h.w| where b cancels h.w
        y = torch.nn.functional.linear(hc, wc, bc).float()
        absdot = ha @ wc.float().abs().t()   # (not abs_: wc may be the weight itself)
        if bc is not None:
            absdot += bc.float().abs()
        z = softcap * torch.tanh(y / softcap) if softcap else y
        r = ref[:, v0:v1].float()
        known = torch.isfinite(r)
        finite_seen = finite_seen or bool(known.any())
        tol = 2 * u * torch.maximum(y.abs(), r.abs()) + acc * absdot
        err = (z - r).abs()
        # a non-finite z (NaN, or an overflow to inf: then err and tol are inf)
        # against a finite logit is a mismatch
        bad = known & (~torch.isfinite(z) | ~(err <= tol))
        if bool(bad.any()):
            score = torch.where(bad, err / tol.clamp(min=1e-30), torch.full_like(err, -1.0))
            score = torch.nan_to_num(score, nan=math.inf, posinf=math.inf)
            i = int(torch.argmax(score.flatten()))
            row, col = divmod(i, v1 - v0)
            cand = (float(score[row, col]), row, v0 + col, float(z[row, col]),
                    float(r[row, col]), float(tol[row, col]))
            if worst is None or cand[0] > worst[0]:
                worst = cand
    if worst is not None:
        _, row, v, zz, rr, tt = worst
        name = lambda d: str(d).replace("torch.", "")   # noqa: E731
        return (f"its last hidden states do not reproduce the model's logits through the LM "
                f"head (at row {row}, vocabulary id {v}: {zz:.6g} against the model's "
                f"{rr:.6g}, tolerance {tt:.3g} for {name(cd)} products and {name(rd)} logits): "
                "the model's forward does more than a linear head (+ final_logit_softcapping)",
                True)
    return None, finite_seen


class _FusedHeadMixin:
    """What gmpo_ext's TRL trainers share: the patched forward that runs the LM
    head fused inside the engine-wrapped model's forward (:class:`_HeadCall`),
    the first-batch head check and the logits-path fallback, the fallback to
    TRL's own ``_compute_loss`` (one warning per reason), and TRL's entropy-bonus
    controller. Listed before the TRL trainer among the bases; the loss itself
    is each trainer's ``_compute_loss``."""

    # config fields that rescale the logits after the head (TRL reads them for
    # its fused head); a model with one of them set uses the logits path
    _LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    # what the fallback warning says of TRL's own loss
    _FALLBACK_NOTE = "unfused"

    def _fused_setup(self, fused_lm_head):
        """Before TRL's __init__ (it may compute a loss, e.g. in a callback)."""
        self.fused_lm_head = bool(fused_lm_head)
        self._gmpo_head_checked = False
        self._gmpo_fallback_warned = set()

    def _warn_once(self, why, what, stacklevel=4):
        if why not in self._gmpo_fallback_warned:
            self._gmpo_fallback_warned.add(why)
            warnings.warn(f"gmpo_ext.trl.{type(self).__name__}: {why}; {what}",
                          stacklevel=stacklevel)

    def _head(self, base, text_config):
        """None when the LM head can be fused, else the reason why not."""
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Linear):
            return f"the LM head is {type(head).__name__}, not a torch.nn.Linear"
        for name in self._LOGIT_SCALES:
            if getattr(text_config, name, None) not in (None, 1, 1.0):
                return f"the config rescales the logits ({name})"
        return None

    def _install_fused_forward(self):
        """Patch the model's forward (the PEFT base model's: PEFT calls it) so that
        ``model(..., gmpo_ext_head=call)`` runs the backbone and the fused head
        inside the forward of whatever wraps the model. There DDP, FSDP1, FSDP2
        and DeepSpeed ZeRO-3 have done what they do for every parameter: FSDP
        has unsharded the head's unit (its pre-backward hooks will unshard it
        again for our backward), ZeRO-3's hooks are armed to reduce the head's
        gradient. Without ``gmpo_ext_head`` the forward is the one it replaces
        (generation, TRL's own head). The head is looked up on every call:
        FSDP and PEFT replace modules after this runs."""
        model = self.model
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(target, "_gmpo_ext_fused_forward", False):
            return
        inner = target.forward

        @functools.wraps(type(target).forward)   # generate() validates kwargs against it
        def forward(module, *args, gmpo_ext_head=None, **kwargs):
            if gmpo_ext_head is None:
                return inner(*args, **kwargs)
            return gmpo_ext_head(module, inner, kwargs)

        target.forward = types.MethodType(forward, target)
        target._gmpo_ext_fused_forward = True

    def _policy_logps_hidden(self, model, input_ids, attention_mask, T, inputs, mask, softcap,
                             aux):
        """Per-token log-probs and entropies (and the MoE auxiliary loss when
        ``aux``) from the last hidden states, the head fused, computed inside the
        wrapped model's forward; a str (why not) when the model's hidden states do
        not reproduce its logits (checked on the first batch)."""
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if inputs.get("token_type_ids") is not None:
            model_inputs["token_type_ids"] = inputs["token_type_ids"]
        call = _HeadCall(self, T, inputs["completion_ids"], mask, softcap,
                         check=not self._gmpo_head_checked, aux=aux)
        with self.accelerator.autocast():
            out = model(**model_inputs, gmpo_ext_head=call)
        if call.why is not None:
            return call.why
        self._gmpo_head_checked = call.conclusive
        return out if aux else (*out, None)

    # TRL's compute_loss may route elsewhere in some releases (Liger's GRPO loss
    # with use_liger_kernel); here the loss always goes through _compute_loss.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError(f"{type(self).__name__} does not support returning outputs")
        return self._compute_loss(model, inputs)

    def _fallback(self, model, inputs, why):
        self._warn_once(why, f"this batch uses TRL's own loss ({self._FALLBACK_NOTE})")
        return super()._compute_loss(model, inputs)

    def _policy_logits(self, model, input_ids, attention_mask, T, inputs, aux):
        """The model's own (B, T+1, V) logits tensor for the completion (or a view),
        whether it is the whole tensor, and the MoE auxiliary loss (``aux``)."""
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                        "logits_to_keep": T + 1, "use_cache": False}
        if inputs.get("token_type_ids") is not None:
            model_inputs["token_type_ids"] = inputs["token_type_ids"]
        if aux:
            model_inputs["output_router_logits"] = True
        with self.accelerator.autocast():
            out = model(**model_inputs)
        logits = out.logits
        exact = logits.shape[1] == T + 1
        if not exact:           # a model that ignored logits_to_keep: a strided view
            logits = logits[:, -(T + 1):]
        return logits, exact, getattr(out, "aux_loss", None) if aux else None

    def _score(self, model, inputs, aux=False):
        """(logps, entropies, mask, aux_loss) of the batch's completions: the
        per-token log-probs and entropies (both differentiable; zero where the
        mask is 0), the completion x tool mask, the MoE router's auxiliary loss
        (``aux``; else None). A str when the batch must go to TRL's own loss
        (the reason)."""
        if any(inputs.get(k) is not None for k in _VISION_KEYS):
            return "vision-language inputs"
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        if not _accepts(base, "logits_to_keep"):
            return f"{type(base).__name__}.forward takes no logits_to_keep"

        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.shape[1]
        mask = completion_mask if "tool_mask" not in inputs \
            else completion_mask * inputs["tool_mask"]

        text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") \
            else base.config
        scored = None
        if self.fused_lm_head:
            why = self._head(base, text_config)
            if why is not None:
                self._warn_once(f"fused LM head unavailable: {why}", "using the logits path",
                                stacklevel=5)
            else:
                scored = self._policy_logps_hidden(
                    model, input_ids, attention_mask, T, inputs, mask,
                    getattr(text_config, "final_logit_softcapping", None), aux)
                if isinstance(scored, str):
                    self.fused_lm_head = False
                    self._warn_once(f"fused LM head: {scored}", "using the logits path from "
                                    "now on", stacklevel=5)
                    scored = None
        if scored is None:
            logits, exact, aux_loss = self._policy_logits(model, input_ids, attention_mask, T,
                                                          inputs, aux)
            # The gradient may overwrite the logits when nothing else needs them for
            # backward: true of a linear lm_head, false of a tanh soft-cap after it.
            inplace = exact and getattr(text_config, "final_logit_softcapping", None) is None
            scored = (*selective_logps(logits, completion_ids, self.temperature,
                                       return_entropy=True, mask=mask, inplace_backward=inplace),
                      aux_loss)
            del logits
        logps, entropies, aux_loss = scored
        if aux and aux_loss is None:
            return "the model returned no aux_loss with output_router_logits=True"
        return logps, entropies, mask, aux_loss

    # -- TRL's entropy bonus (entropy_coef, use_adaptive_entropy) -------------

    def _entropy_coef_now(self):
        """The coefficient this micro-batch applies: TRL's, fixed for the whole
        accumulation window (the adaptive controller's gate reads the entropy
        measured at the end of the previous optimizer step)."""
        if self.use_adaptive_entropy:
            return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target \
                else 0.0
        return self.entropy_coef

    @torch.no_grad()
    def _entropy_controller(self, mode, entropies, effective_mask):
        """Advance TRL's adaptive entropy controller as TRL's GRPOTrainer does
        (the window's entropy sum and token count, reduced over the ranks at the
        optimizer-step boundary; the coefficient moved by entropy_coef_delta
        within [entropy_coef_min, entropy_coef_max]) and log ``entropy_coef``."""
        args = self.args
        if self.use_adaptive_entropy and mode == "train":
            em = effective_mask.to(entropies.dtype)
            stats = torch.stack([(entropies.detach() * em).sum(), em.sum()])
            self._entropy_window_stats = stats if self._entropy_window_stats is None \
                else self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta,
                                            args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta,
                                            args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _global_masked_mean(self, x, mask, per_row=False):
        """TRL's global_masked_mean: over the counted tokens of every rank, or
        (``per_row``: a (B, 1) quantity) over every rank's rows. (TRL decides by
        x.shape[1] == 1, which also takes a per-token (B, 1) tensor, completions
        of length 1, for a per-row one; here the caller says which it is.)"""
        if per_row:
            local = torch.stack([x.float().sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            m = mask.to(torch.float32)
            x = torch.where(m != 0, x.float(), torch.zeros((), device=x.device))
            local = torch.stack([(x * m).sum(), m.sum()])
        totals = self.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_aux_loss(self, mode, aux_loss):
        self._metrics[mode]["aux_loss"].append(
            self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())


class GMPOTrainer(_FusedHeadMixin, TRLGMPOTrainer):
    """TRL's GMPOTrainer with the loss computed by gmpo_ext's fused kernels.

    Same constructor as ``trl.experimental.gmpo.GMPOTrainer`` plus these
    keywords:

    Args:
        rollout_is_correction: apply the rollout engine's importance-sampling
            ratio (vLLM) as a per-row weight of the policy term (default True;
            TRL's own GMPO ignores it). See the module docstring.
        fused_lm_head: compute the log-probs from the last hidden states with
            the LM head fused (default True: the (B, T, V) logits are never
            held); False: from the model's logits (gmpo_ext's logits path).
        router_aux_loss: add the MoE router's load-balancing loss as TRL's
            GRPOTrainer does (coefficient ``router_aux_loss_coef``, or the
            architecture's own; only for a model whose config has
            ``output_router_logits``). Default False: TRL's GMPOTrainer drops it.

    The GMPOConfig options TRL's GMPOTrainer ignores and this trainer applies
    (each off unless set): ``entropy_coef`` / ``use_adaptive_entropy`` (the
    entropy bonus, fixed or adaptive, TRL GRPOTrainer's definition and
    controller), ``off_policy_mask_threshold`` (a dropped row's policy term is
    0; its KL term stays), ``delta`` (>= 1; each token's log-ratio is capped
    at ``log(delta)``, so the row's geometric-mean ratio never exceeds
    ``delta``). See the module docstring.
    """

    _tag_names = ["trl", "gmpo", "gmpo_ext"]
    _FALLBACK_NOTE = "unfused; the rollout importance-sampling ratio is ignored there"

    def __init__(self, *args, rollout_is_correction: bool = True, fused_lm_head: bool = True,
                 router_aux_loss: bool = False, **kwargs):
        self.rollout_is_correction = bool(rollout_is_correction)
        self.router_aux_loss = bool(router_aux_loss)
        self._fused_setup(fused_lm_head)
        super().__init__(*args, **kwargs)
        delta = getattr(self.args, "delta", None)
        if delta is not None and not (isinstance(delta, (int, float))
                                      and not isinstance(delta, bool) and delta >= 1):
            raise ValueError(f"delta must be a number >= 1 (the cap of the geometric-mean "
                             f"ratio; below 1 it would cap inside GMPO's own clip range) or "
                             f"None, got {delta!r}")
        if self.fused_lm_head:
            self._install_fused_forward()

    def _fallback(self, model, inputs, why):
        unfused = [name for name, on in (
            ("entropy_coef", self._entropy_bonus_enabled),
            ("off_policy_mask_threshold", self.off_policy_mask_threshold is not None),
            ("delta", getattr(self.args, "delta", None) is not None),
            ("router_aux_loss", self._aux_on())) if on]
        if unfused:   # TRL's GMPO would silently drop these: refuse rather than train without
            raise ValueError(f"gmpo_ext.trl.GMPOTrainer: {why}, and TRL's own GMPO loss (the "
                             f"fallback) ignores {', '.join(unfused)}")
        return super()._fallback(model, inputs, why)

    def _aux_on(self):
        return self.router_aux_loss and self.aux_loss_enabled

    def _compute_loss(self, model, inputs):
        scored = self._score(model, inputs, aux=self._aux_on())
        if isinstance(scored, str):
            return self._fallback(model, inputs, scored)
        logps, entropies, mask, aux_loss = scored
        ent = entropies.detach()

        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(ent, mask, 1 - self.top_entropy_quantile)
            seq_mask = mask * entropy_mask
        else:
            seq_mask = mask

        advantages = inputs["advantages"]
        old_logps = inputs.get("old_per_token_logps")
        if old_logps is None:       # num_iterations == 1 and on-policy: ratio 1
            old_logps = logps.detach()
        ref_logps = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None

        is_weights = inputs.get("importance_sampling_ratio") if self.rollout_is_correction else None
        if is_weights is not None:
            if is_weights.dim() == 2 and is_weights.shape[1] == 1:
                is_weights = is_weights.reshape(-1)       # sequence modes: one weight per row
            is_weights = is_weights.detach()

        # off-policy sequence mask (TRL GRPOTrainer's definition): a dropped row's
        # advantage is 0, so its policy term and its gradient are exactly 0 (its
        # KL term stays, as in TRL's GRPO)
        loss_adv = advantages
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old_logps)
            keep = self.get_off_policy_mask(advantages.unsqueeze(1), logps, sampling, mask,
                                            self.off_policy_mask_threshold)
            loss_adv = advantages * keep.reshape(-1).to(advantages.dtype)

        # delta (>= 1): each token's log-ratio capped at log(delta); as log(delta)
        # >= 0 > -epsilon_low, capping before GMPO's clip equals capping after it
        # (the capped tokens get no gradient, as under TRL GRPO's clamp); the
        # geometric mean then never exceeds delta
        delta = getattr(self.args, "delta", None)
        loss_logps = logps
        if delta is not None:
            cap = math.log(delta)
            loss_logps = torch.where(logps.detach() - old_logps > cap,
                                     (old_logps + cap).to(logps.dtype), logps)

        mode = "train" if self.model.training else "eval"
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # TRL applies the entropy mask to the geometric mean only; with it on (or
        # delta's cap), the KL term (plain mask, uncapped log-probs) is added
        # separately on the (B, T) log-probs.
        fused_kl = self.beta != 0.0 and seq_mask is mask and delta is None
        loss, gm = gmpo_loss(loss_logps, old_logps, loss_adv, seq_mask,
                             epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                             beta=self.beta if fused_kl else 0.0,
                             ref_logps=ref_logps if fused_kl else None,
                             is_weights=is_weights, convention="trl",
                             normalizer=float(normalizer), return_metrics=True)
        if self.beta != 0.0:
            d = torch.where(mask != 0, ref_logps - logps, torch.zeros((), device=logps.device))
            per_token_kl = torch.exp(d) - d - 1
            if not fused_kl:
                mf = mask.to(per_token_kl.dtype)
                seq_kl = (per_token_kl * mf).sum(-1) / mf.sum(-1).clamp(min=1.0)
                loss = loss + self.beta * seq_kl.mean() / normalizer

        if self._entropy_bonus_enabled:
            # TRL GRPOTrainer's bonus: the mean entropy of the tokens the policy
            # term acts on, scaled for gradient accumulation only
            eff = seq_mask.to(entropies.dtype)
            bonus = (entropies * eff).sum() / eff.sum().clamp(min=1.0) / normalizer
            self._metrics[mode]["policy_loss"].append(
                self.accelerator.gather(loss.detach() * normalizer).nanmean().item())
            loss = loss - self._entropy_coef_now() * bonus
            self._entropy_controller(mode, ent, seq_mask)
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._log_aux_loss(mode, aux_loss)

        self._log_gmpo_metrics(mode, logps.detach(), old_logps, advantages, mask, ent,
                               per_token_kl.detach() if self.beta != 0.0 else None, gm)
        return loss

    @torch.no_grad()
    def _log_gmpo_metrics(self, mode, logps, old_logps, advantages, mask, entropies,
                          per_token_kl, gm):
        """TRL's GMPO metrics (same names, same cross-process reductions), and ours."""
        m = mask.to(torch.float32)
        reduce = self.accelerator.reduce
        metrics = self._metrics[mode]

        def global_masked_mean(x):
            return self._global_masked_mean(x, mask)

        def masked_seq_mean(x):    # NaN for an empty row, as TRL (then nanmin/nanmax)
            return (x * m).sum(-1) / m.sum(-1)

        if per_token_kl is not None:
            metrics["kl"].append(global_masked_mean(per_token_kl))
        metrics["entropy"].append(global_masked_mean(entropies))

        log_ratio = logps - old_logps
        adv = advantages.unsqueeze(1)
        low = ((log_ratio < -self.epsilon_low) & (adv < 0)).float()
        high = ((log_ratio > self.epsilon_high) & (adv > 0)).float()
        region = ((low + high) > 0).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(region))
        gather = self.accelerator.gather
        metrics["clip_ratio/low_min"].append(nanmin(gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(gather(masked_seq_mean(high))).item())

        # the range of the per-token log importance ratio (the paper's stability plot)
        valid = m != 0
        inf = torch.tensor(float("inf"), device=log_ratio.device)
        lr_min = torch.where(valid, log_ratio.float(), inf).amin() if valid.any() else inf
        lr_max = torch.where(valid, log_ratio.float(), -inf).amax() if valid.any() else -inf
        lo_hi = gather(torch.stack([lr_min, -lr_max]).reshape(1, 2)).amin(0)
        if torch.isfinite(lo_hi).all():
            metrics[LOG_RATIO_MIN].append(lo_hi[0].item())
            metrics[LOG_RATIO_MAX].append((-lo_hi[1]).item())
        metrics[MAX_MEAN_LOG_RATIO].append(gather(gm[MAX_MEAN_LOG_RATIO].reshape(1)).amax().item())
        metrics[NONFINITE_ROWS].append(reduce(gm[NONFINITE_ROWS].reshape(1),
                                              reduction="sum").item())


# TRL's loss types that divide by the generation batch's token count
# (num_items_in_batch) rather than by gradient-accumulation steps
_ITEM_NORMALISED = ("dapo", "cispo", "vespo")
_CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


class GRPOTrainer(_FusedHeadMixin, TRLGRPOTrainer):
    """TRL's GRPOTrainer with the LM head and the loss fused: a one-line swap,

        from gmpo_ext.trl import GRPOTrainer        # instead of from trl import GRPOTrainer

    Everything but the loss step is TRL's own. The loss step scores the
    completions with the fused head (or the logits path), as
    :class:`GMPOTrainer` does, and computes TRL's loss with
    :func:`gmpo_ext.grpo_loss`, every option ``GRPOTrainer._compute_loss``
    reads mapped to its arguments: ``loss_type``, ``importance_sampling_level``,
    ``epsilon`` / ``epsilon_high``, ``delta``, ``beta`` with
    ``use_bias_correction_kl``, ``off_policy_mask_threshold`` (with the
    batch's ``sampling_per_token_logps``), the vLLM ``importance_sampling_ratio``,
    ``top_entropy_quantile`` (TRL's own ``get_high_entropy_mask`` on the fused
    head's entropies), ``entropy_coef`` fixed or adaptive (TRL's controller and
    its state), the SAPO temperatures and VESPO's gamma parameters, each loss
    type's normaliser with gradient accumulation and ``num_items_in_batch``,
    tool masks; the MoE router's auxiliary loss when the model returns it; TRL's
    metric names and reductions.

    Cases not fused go to TRL's own ``_compute_loss`` (TRL's fused head), one
    warning per reason naming it: vision-language inputs, a forward without
    ``logits_to_keep``, per-token (B, T) advantages.

    Args:
        fused_lm_head: as in :class:`GMPOTrainer` (default True).
    """

    _tag_names = ["trl", "grpo", "gmpo_ext"]
    _FALLBACK_NOTE = "unfused, same result"

    def __init__(self, *args, fused_lm_head: bool = True, **kwargs):
        self._fused_setup(fused_lm_head)
        super().__init__(*args, **kwargs)
        if self.fused_lm_head:
            self._install_fused_forward()

    def _unfused(self, inputs):
        """Why this batch cannot be fused, or None."""
        adv = inputs["advantages"]
        if adv.dim() == 2 and adv.shape[1] != 1:
            return "per-token (B, T) advantages"
        return None

    def _is_weights(self, inputs):
        """TRL's use of the rollout importance-sampling ratio: vespo folds it into
        its gamma weights whenever the batch has it; the other types multiply
        the per-token loss by it with vLLM's correction on."""
        if self.loss_type == "vespo" or \
                (self.use_vllm and self.vllm_importance_sampling_correction):
            w = inputs.get("importance_sampling_ratio") if self.loss_type == "vespo" \
                else inputs["importance_sampling_ratio"]
            return None if w is None else w.detach()
        return None

    def _loss_kwargs(self, inputs, logps, mask, entropies, entropy_mask, mode):
        """grpo_loss's arguments for this batch, TRL's options mapped one to one."""
        args = self.args
        gas = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        kw = dict(loss_type=self.loss_type, epsilon_low=self.epsilon_low,
                  epsilon_high=self.epsilon_high, beta=self.beta, normalizer=float(gas))
        if self.beta != 0.0:
            kw["ref_logps"] = inputs["ref_per_token_logps"]
            if args.use_bias_correction_kl:
                kw["use_bias_correction_kl"] = True
        if self.importance_sampling_level == "sequence":
            kw["importance_sampling_level"] = "sequence"
        elif self.importance_sampling_level != "token":
            raise ValueError(f"Unknown importance sampling level: {self.importance_sampling_level}")
        if args.delta is not None and self.loss_type in _CLIP_TYPES:
            kw["delta"] = float(args.delta)
        if self.off_policy_mask_threshold is not None:
            kw["off_policy_mask_threshold"] = float(self.off_policy_mask_threshold)
            # the rollout engine's log-probs when the batch has them, else (TRL) the old ones
            kw["sampling_logps"] = inputs.get("sampling_per_token_logps",
                                              inputs.get("old_per_token_logps", logps.detach()))
        if entropy_mask is not None:
            kw["token_mask"] = entropy_mask
        isw = self._is_weights(inputs)
        if isw is not None:
            kw["is_weights"] = isw
        if self.loss_type == "sapo":
            kw.update(sapo_temperature_pos=args.sapo_temperature_pos,
                      sapo_temperature_neg=args.sapo_temperature_neg)
        if self.loss_type == "vespo":
            kw.update(vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
                      vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg)
        if self.loss_type == "dr_grpo":
            kw["max_completion_length"] = int(self.max_completion_length)
        if self.loss_type in _ITEM_NORMALISED:
            # TRL: sum / (num_items_in_batch / processes * gas / steps_per_generation)
            # in training (the generation batch's tokens, one accumulation window's
            # share): here num_items_in_batch / processes / steps_per_generation,
            # and the gas in normalizer (which also scales the entropy bonus)
            items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                items = items / args.steps_per_generation
            kw["num_items_in_batch"] = items
        if self._entropy_bonus_enabled:
            kw["entropies"] = entropies
            kw["entropy_coef"] = float(self._entropy_coef_now())
        return kw

    def _compute_loss(self, model, inputs):
        why = self._unfused(inputs)
        if why is not None:
            return self._fallback(model, inputs, why)
        scored = self._score(model, inputs, aux=self.aux_loss_enabled)
        if isinstance(scored, str):
            return self._fallback(model, inputs, scored)
        logps, entropies, mask, aux_loss = scored
        ent = entropies.detach()
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(ent, mask, 1 - self.top_entropy_quantile)

        advantages = inputs["advantages"]
        if advantages.dim() == 2:
            advantages = advantages.reshape(-1)
        old_logps = inputs.get("old_per_token_logps")
        if old_logps is None:       # num_iterations == 1 and on-policy: ratio 1
            old_logps = logps.detach()
        mode = "train" if self.model.training else "eval"
        kw = self._loss_kwargs(inputs, logps, mask, entropies, entropy_mask, mode)
        loss, core_metrics = grpo_loss(logps, old_logps, advantages, mask, return_metrics=True,
                                       **kw)

        if self._entropy_bonus_enabled:
            with torch.no_grad():   # TRL's policy_loss metric: the loss without the bonus
                pkw = {k: v for k, v in kw.items() if k not in ("entropies", "entropy_coef")}
                if self.loss_type not in _ITEM_NORMALISED:
                    pkw["normalizer"] = 1.0   # TRL logs it before the gas division
                policy = grpo_loss(logps.detach(), old_logps, advantages, mask, **pkw)
            self._metrics[mode]["policy_loss"].append(
                self.accelerator.gather(policy.detach()).nanmean().item())
            eff = mask if entropy_mask is None else mask * entropy_mask
            self._entropy_controller(mode, ent, eff)
        if aux_loss is not None:
            gas = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / gas
            self._log_aux_loss(mode, aux_loss)

        self._log_grpo_metrics(mode, inputs, logps.detach(), old_logps, advantages, mask, ent,
                               core_metrics)
        return loss

    @torch.no_grad()
    def _log_grpo_metrics(self, mode, inputs, logps, old_logps, advantages, mask, entropies,
                          core_metrics):
        """TRL's GRPO metrics: same names, same definitions, same cross-process
        reductions (on the (B, T) log-probs, no grad), and gmpo/nonfinite_rows."""
        metrics = self._metrics[mode]
        m = mask.to(torch.float32)
        adv = advantages.unsqueeze(1)
        log_ratio = logps - old_logps
        if self.importance_sampling_level == "sequence":
            liw = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        else:
            liw = log_ratio
        coef_1 = torch.exp(liw)

        seq = self.importance_sampling_level == "sequence"   # coef_1 is (B, 1), per row

        def global_masked_mean(x, per_row=False):
            return self._global_masked_mean(x, mask, per_row)

        def masked_seq_mean(x):
            return x.squeeze(1) if seq else (x * m).sum(-1) / m.sum(-1)

        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            d = torch.where(mask != 0, ref - logps, torch.zeros((), device=logps.device))
            kl = torch.exp(d) - d - 1
            if self.args.use_bias_correction_kl:
                kl = kl * coef_1
            metrics["kl"].append(global_masked_mean(kl))
        metrics["entropy"].append(global_masked_mean(entropies))
        if self.loss_type in _CLIP_TYPES:
            if self.args.delta is not None:   # TRL clips with the ratio capped at delta
                coef_1 = coef_1.clamp(max=self.args.delta)
            low = ((coef_1 < 1 - self.epsilon_low) & (adv < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (adv > 0)).float()
            region = ((low + high) > 0).float()
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low, seq))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high, seq))
            metrics["clip_ratio/region_mean"].append(global_masked_mean(region, seq))
            gather = self.accelerator.gather
            metrics["clip_ratio/low_min"].append(nanmin(gather(masked_seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(gather(masked_seq_mean(high))).item())
        elif self.loss_type == "cispo":
            clipped = ((coef_1 > self.epsilon_high) & (adv > 0)).float()
            metrics["cispo_clip_ratio"].append(global_masked_mean(clipped, seq))
        elif self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages=adv, log_ratio_per_token=log_ratio, mask=mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                k_pos=self.args.vespo_k_pos, lambda_pos=self.args.vespo_lambda_pos,
                k_neg=self.args.vespo_k_neg, lambda_neg=self.args.vespo_lambda_neg)
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi, per_row=True))
        if NONFINITE_ROWS in core_metrics:
            metrics[NONFINITE_ROWS].append(self.accelerator.reduce(
                core_metrics[NONFINITE_ROWS].reshape(1), reduction="sum").item())
