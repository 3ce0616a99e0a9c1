"""GMPO in TRL, fused: a drop-in replacement for ``trl.experimental.gmpo.GMPOTrainer``.

    from gmpo_ext.trl import GMPOTrainer        # instead of trl.experimental.gmpo
    trainer = GMPOTrainer(model=..., reward_funcs=..., args=GMPOConfig(...), ...)

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
    from trl.trainer.utils import nanmax, nanmin
except ImportError as _e:  # pragma: no cover - a supported release always has them
    raise ImportError(f"gmpo_ext.trl: TRL {TRL_VERSION} lacks trl.experimental.gmpo ({_e}); "
                      f"install a supported release: {_INSTALL_HINT}") from None

from .loss import MAX_MEAN_LOG_RATIO, NONFINITE_ROWS, gmpo_loss  # noqa: E402
from .logits import selective_logps  # noqa: E402
from . import hidden as _hidden  # noqa: E402
from .hidden import linear_logps  # noqa: E402

__all__ = ["GMPOTrainer", "GMPOConfig", "TRL_SUPPORTED", "TRL_VERSION"]

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

    def __init__(self, trainer, T, completion_ids, mask, softcap, check):
        self.trainer, self.T, self.ids, self.mask = trainer, T, completion_ids, mask
        self.softcap, self.check, self.why, self.conclusive = softcap, check, None, True

    def __call__(self, module, forward, kwargs):
        T = self.T
        kwargs.update(logits_to_keep=1, use_cache=False, output_hidden_states=True)
        out = forward(**kwargs)
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


class GMPOTrainer(TRLGMPOTrainer):
    """TRL's GMPOTrainer with the loss computed by gmpo_ext's fused kernels.

    Same constructor as ``trl.experimental.gmpo.GMPOTrainer`` plus one
    keyword:

    Args:
        rollout_is_correction: apply the rollout engine's importance-sampling
            ratio (vLLM) as a per-row weight of the policy term (default True;
            TRL's own GMPO ignores it). See the module docstring.
        fused_lm_head: compute the log-probs from the last hidden states with
            the LM head fused (default True: the (B, T, V) logits are never
            held); False: from the model's logits (gmpo_ext's logits path).
    """

    _tag_names = ["trl", "gmpo", "gmpo_ext"]

    # config fields that rescale the logits after the head (TRL reads them for
    # its fused head); a model with one of them set uses the logits path
    _LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")

    def __init__(self, *args, rollout_is_correction: bool = True, fused_lm_head: bool = True,
                 **kwargs):
        self.rollout_is_correction = bool(rollout_is_correction)
        self.fused_lm_head = bool(fused_lm_head)
        self._gmpo_head_checked = False
        self._gmpo_fallback_warned = set()
        super().__init__(*args, **kwargs)
        if self.fused_lm_head:
            self._install_fused_forward()

    def _warn_once(self, why, what):
        if why not in self._gmpo_fallback_warned:
            self._gmpo_fallback_warned.add(why)
            warnings.warn(f"gmpo_ext.trl.GMPOTrainer: {why}; {what}", stacklevel=4)

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

    def _policy_logps_hidden(self, model, input_ids, attention_mask, T, inputs, mask, softcap):
        """Per-token log-probs and entropies from the last hidden states, the head
        fused, computed inside the wrapped model's forward; a str (why not) when
        the model's hidden states do not reproduce its logits (checked on the
        first batch)."""
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if inputs.get("token_type_ids") is not None:
            model_inputs["token_type_ids"] = inputs["token_type_ids"]
        call = _HeadCall(self, T, inputs["completion_ids"], mask, softcap,
                         check=not self._gmpo_head_checked)
        with self.accelerator.autocast():
            out = model(**model_inputs, gmpo_ext_head=call)
        if call.why is not None:
            return call.why
        self._gmpo_head_checked = call.conclusive
        return out

    # TRL's compute_loss may route to Liger's GRPO loss (use_liger_kernel); GMPO
    # always goes through _compute_loss here.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("GMPOTrainer does not support returning outputs")
        return self._compute_loss(model, inputs)

    def _fallback(self, model, inputs, why):
        if why not in self._gmpo_fallback_warned:
            self._gmpo_fallback_warned.add(why)
            warnings.warn(f"gmpo_ext.trl.GMPOTrainer: {why}; this batch uses TRL's own GMPO loss "
                          "(unfused; the rollout importance-sampling ratio is ignored there)",
                          stacklevel=3)
        return super()._compute_loss(model, inputs)

    def _policy_logits(self, model, input_ids, attention_mask, T, inputs):
        """The model's own (B, T+1, V) logits tensor for the completion (or a view)."""
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                        "logits_to_keep": T + 1, "use_cache": False}
        if inputs.get("token_type_ids") is not None:
            model_inputs["token_type_ids"] = inputs["token_type_ids"]
        with self.accelerator.autocast():
            logits = model(**model_inputs).logits
        exact = logits.shape[1] == T + 1
        if not exact:           # a model that ignored logits_to_keep: a strided view
            logits = logits[:, -(T + 1):]
        return logits, exact

    def _compute_loss(self, model, inputs):
        if any(inputs.get(k) is not None for k in _VISION_KEYS):
            return self._fallback(model, inputs, "vision-language inputs")
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        if not _accepts(base, "logits_to_keep"):
            return self._fallback(model, inputs, f"{type(base).__name__}.forward takes no "
                                  "logits_to_keep")

        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        B, T = completion_ids.shape
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") \
            else base.config
        scored = None
        if self.fused_lm_head:
            why = self._head(base, text_config)
            if why is not None:
                self._warn_once(f"fused LM head unavailable: {why}", "using the logits path")
            else:
                scored = self._policy_logps_hidden(
                    model, input_ids, attention_mask, T, inputs, mask,
                    getattr(text_config, "final_logit_softcapping", None))
                if isinstance(scored, str):
                    self.fused_lm_head = False
                    self._warn_once(f"fused LM head: {scored}", "using the logits path from "
                                    "now on")
                    scored = None
        if scored is None:
            logits, exact = self._policy_logits(model, input_ids, attention_mask, T, inputs)
            # The gradient may overwrite the logits when nothing else needs them for
            # backward: true of a linear lm_head, false of a tanh soft-cap after it.
            inplace = exact and getattr(text_config, "final_logit_softcapping", None) is None
            scored = selective_logps(logits, completion_ids, self.temperature,
                                     return_entropy=True, mask=mask, inplace_backward=inplace)
            del logits
        logps, entropies = scored
        entropies = entropies.detach()

        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
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

        mode = "train" if self.model.training else "eval"
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # TRL applies the entropy mask to the geometric mean only; with it on,
        # the KL term (plain mask) is added separately on the (B, T) log-probs.
        fused_kl = self.beta != 0.0 and seq_mask is mask
        loss, gm = gmpo_loss(logps, old_logps, advantages, seq_mask,
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

        self._log_gmpo_metrics(mode, logps.detach(), old_logps, advantages, mask, entropies,
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
            x = torch.where(m != 0, x.float(), torch.zeros((), device=x.device))
            totals = reduce(torch.stack([(x * m).sum(), m.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

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
