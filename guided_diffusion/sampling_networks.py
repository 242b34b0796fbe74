"""The networks as the sampling loops call them: checkpoints built with their flags and speed options, labels, guidance.

A script names each checkpoint it needs by a flag (a `Checkpoint`); the network's flags are
resolved by `checkpoints.resolve_flags` (defaults, then the checkpoint's own, then typed ones).
"""

import contextlib
import os

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from . import dist_util, logger
from .checkpoints import carried_flags, mismatch_message, resolve_flags
from .errors import UsageError
from .fp16_util import use_fp16_if_supported
from .respace import space_timesteps
from .script_util import classifier_defaults, create_classifier, create_model_and_diffusion, sr_create_model_and_diffusion

AUTOCAST_DTYPES = {"bf16": th.bfloat16, "fp16": th.float16}
# below this many parameters a network's CPU ops are too small for a second thread to pay: on busy
# cores its threads wait on each other (the embedded default's digits: 2 s with one thread, 25-44 s
# with two while other jobs ran on the 2 cores)
SMALL_NETWORK = 10_000_000


class Checkpoint:
    """A checkpoint named by a flag (e.g. --model_path), with the flags of the network it holds.

    :param explicit: names of the flags typed on the command line (they override the checkpoint's).
    :param kind: "model", "sr" or "classifier" (as in `checkpoints.OFFICIAL`).
    :param defaults: the script's defaults for this network's flags.
    """

    def __init__(self, args, explicit, flag, kind, defaults):
        self.flag, self.kind, self.path, self.args = f"--{flag}", kind, getattr(args, flag), args
        if not self.path:
            raise UsageError(f"{self.flag} is required: a checkpoint file (official ones: python models/download.py NAME)")
        self.state_dict = dist_util.load_model_state_dict(self.path, map_location="cpu")
        carried, self.source = carried_flags(self.path, kind, self.state_dict, self.flag)
        self.flags = resolve_flags(defaults, carried, {k: getattr(args, k) for k in explicit})

    def check_matches(self, other, *names):
        """Raise if this network and another disagree on any of the named flags (e.g. image_size)."""
        for name in names:
            if self.flags[name] != other.flags[name]:
                raise UsageError(
                    f"{self.flag} {self.path} has {name} {self.flags[name]} but {other.flag} {other.path} "
                    f"has {other.flags[name]}: they must match"
                )

    def load(self):
        """(network on this rank's device in eval mode, its diffusion or None for a classifier)."""
        flags = self.flags
        if self.kind != "classifier":
            try:
                space_timesteps(flags["diffusion_steps"], flags["timestep_respacing"] or [flags["diffusion_steps"]])
            except ValueError as e:
                raise UsageError(f"--timestep_respacing {flags['timestep_respacing']!r} cannot be made from {flags['diffusion_steps']} steps: {e}") from e
        try:
            if self.kind == "classifier":
                net, diffusion = create_classifier(**{k: flags[k] for k in classifier_defaults()}), None
            else:
                net, diffusion = (create_model_and_diffusion if self.kind == "model" else sr_create_model_and_diffusion)(**flags)
        except UsageError:
            raise
        except (ValueError, AssertionError) as e:
            raise UsageError(f"the flags for {self.flag} {self.path} do not make a network: {e or type(e).__name__}") from e
        message = mismatch_message(net, self.state_dict, self.path)
        if message:
            raise UsageError(message)
        net.load_state_dict(self.state_dict)
        del self.state_dict
        net.to(dist_util.dev())
        use_fp16 = flags.get("use_fp16", flags.get("classifier_use_fp16"))
        if use_fp16 and self.args.autocast:
            logger.log(f"{self.flag}: --autocast {self.args.autocast} in place of use_fp16's conversion")
        else:
            use_fp16_if_supported(net, use_fp16, dist_util.dev())
        if dist_util.dev().type == "cpu" and "OMP_NUM_THREADS" not in os.environ and sum(p.numel() for p in net.parameters()) < SMALL_NETWORK:
            th.set_num_threads(1)
        return speed_up(net.eval(), self.args.autocast, self.args.channels_last, self.args.compile), diffusion


def speed_up(net, autocast="", channels_last=False, compile=False):
    """The network with the speed options applied: autocast ("", "bf16", "fp16"), channels_last, torch.compile."""
    if autocast or channels_last:
        net = _Fast(net, AUTOCAST_DTYPES.get(autocast), channels_last)
    return th.compile(net) if compile else net


class _Fast(nn.Module):
    """A network run under autocast and/or on channels_last inputs; it returns float32 in the standard layout.

    The diffusion arithmetic after it (x0 from eps, posterior means, guidance) stays float32.
    """

    def __init__(self, net, autocast_dtype, channels_last):
        super().__init__()
        self.net = net.to(memory_format=th.channels_last) if channels_last else net
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last

    def forward(self, x, timesteps, **kwargs):
        dtype = x.dtype
        if self.channels_last:
            x = x.contiguous(memory_format=th.channels_last)
        autocast = th.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with autocast:
            out = self.net(x, timesteps, **kwargs)
        return out.to(dtype, memory_format=th.contiguous_format)


def label_aware(model, class_cond):
    """The model as the loops call it: labels y reach it only when it is class-conditional."""

    def model_fn(x, t, y=None, **kwargs):
        return model(x, t, y=y if class_cond else None, **kwargs)

    return model_fn


def classifier_guidance(classifier, scale):
    """ADM's cond_fn: scale * d/dx log softmax(classifier(x_t, t))[y]."""

    def cond_fn(x, t, y=None, **kwargs):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def per_sample(fn):
    """fn(x, t, **kwargs) evaluated one sample at a time, so a sample's result never depends on its batch.

    fn returns a tensor, or a dict of them (a guidance function with several named objectives).
    """

    def call(x, t, **kwargs):
        parts = [fn(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in kwargs.items()}) for i in range(len(x))]
        if isinstance(parts[0], dict):  # several named guidance objectives
            return {name: th.cat([p[name] for p in parts]) for name in parts[0]}
        return th.cat(parts)

    return call
