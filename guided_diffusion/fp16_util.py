"""Mixed-precision helpers: fp16 conversion of the networks and an fp16 trainer with loss scaling."""

import torch as th
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import logger

INITIAL_LOG_LOSS_SCALE = 20.0


def convert_module_to_f16(l):
    """Convert a convolution's weight and bias to float16 (other layers stay float32)."""
    if isinstance(l, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        l.weight.data = l.weight.data.half()
        if l.bias is not None:
            l.bias.data = l.bias.data.half()


def convert_module_to_f32(l):
    """Convert a convolution's weight and bias back to float32."""
    if isinstance(l, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        l.weight.data = l.weight.data.float()
        if l.bias is not None:
            l.bias.data = l.bias.data.float()


def get_param_groups_and_shapes(named_model_params):
    """Split (name, parameter) pairs into two groups, each flattened into one master parameter.

    Scalars and vectors become one flat vector (shape -1); matrices and kernels one row
    (shape (1, -1)), so that an optimizer sees two parameters whatever the network.
    """
    named_model_params = list(named_model_params)
    vectors = [(n, p) for n, p in named_model_params if p.ndim <= 1]
    matrices = [(n, p) for n, p in named_model_params if p.ndim > 1]
    return [(vectors, (-1)), (matrices, (1, -1))]


def make_master_params(param_groups_and_shapes):
    """One float32 master parameter per group: the group's values flattened and concatenated."""
    return [
        nn.Parameter(_flatten_dense_tensors([p.detach().float() for _, p in group]).view(shape))
        for group, shape in param_groups_and_shapes
    ]


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    """Gather the model's (possibly fp16) gradients into the float32 master parameters' gradients."""
    for master_param, (group, shape) in zip(master_params, param_groups_and_shapes):
        master_param.grad = _flatten_dense_tensors([param_grad_or_zeros(p).float() for _, p in group]).view(shape)


def master_params_to_model_params(param_groups_and_shapes, master_params):
    """Copy the master parameters' values back into the model's parameters."""
    for master_param, (group, _) in zip(master_params, param_groups_and_shapes):
        for (_, param), value in zip(group, unflatten_master_params(group, master_param.view(-1))):
            param.detach().copy_(value)


def unflatten_master_params(param_group, master_param):
    """Views of a flat master parameter shaped like the group's parameters, in order."""
    return _unflatten_dense_tensors(master_param, [p for _, p in param_group])


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    """The model's state dict with the parameters' values taken from master_params."""
    state_dict = model.state_dict()
    if use_fp16:
        for master_param, (group, _) in zip(master_params, param_groups_and_shapes):
            for (name, _), value in zip(group, unflatten_master_params(group, master_param.view(-1))):
                state_dict[name] = value
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            state_dict[name] = value
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    """Master parameters holding a state dict's values, laid out as the trainer's are."""
    named_values = [(name, state_dict[name]) for name, _ in model.named_parameters()]
    if use_fp16:
        return make_master_params(get_param_groups_and_shapes(named_values))
    return [value for _, value in named_values]


def zero_master_grads(master_params):
    """Drop the master parameters' gradients."""
    for param in master_params:
        param.grad = None


def zero_grad(model_params):
    """Zero the gradients of the model's parameters in place (those that have one)."""
    for param in model_params:
        if param.grad is not None:
            param.grad.detach_()
            param.grad.zero_()


def param_grad_or_zeros(param):
    """A parameter's gradient, or zeros if it has none (unused so far)."""
    return param.grad.detach() if param.grad is not None else th.zeros_like(param)


def check_overflow(value):
    """Whether a (gradient norm) value is infinite or NaN."""
    return value in (float("inf"), -float("inf")) or value != value


class MixedPrecisionTrainer:
    """Backward and optimizer steps for a model, in float32 or fp16 with dynamic loss scaling.

    In fp16 the model computes in half precision while the optimizer updates two flat float32
    master parameters (see get_param_groups_and_shapes); the loss scale grows slowly and
    halves whenever a gradient overflows. In float32 the master parameters are the model's.
    """

    def __init__(self, *, model, use_fp16=False, fp16_scale_growth=1e-3, initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = initial_lg_loss_scale
        if use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            model.convert_to_fp16()

    def zero_grad(self):
        """Zero the model's gradients before a new batch."""
        zero_grad(self.model_params)

    def backward(self, loss):
        """Backpropagate loss, scaled by 2^lg_loss_scale in fp16."""
        if self.use_fp16:
            (loss * 2**self.lg_loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt):
        """Take an optimizer step; in fp16 skip it (and halve the scale) on overflow. Returns whether it stepped."""
        return self._optimize_fp16(opt) if self.use_fp16 else self._optimize_normal(opt)

    def _optimize_fp16(self, opt):
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        grad_norm, param_norm = self._compute_norms(grad_scale=2**self.lg_loss_scale)
        if check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_master_grads(self.master_params)
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        for p in self.master_params:
            p.grad.mul_(1.0 / 2**self.lg_loss_scale)
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt):
        grad_norm, param_norm = self._compute_norms()
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    def _compute_norms(self, grad_scale=1.0):
        """Global L2 norms of the (unscaled) gradients and of the parameters."""
        with th.no_grad():
            grads = [p.grad.float().norm() for p in self.master_params if p.grad is not None]
            params = [p.float().norm() for p in self.master_params]
            grad_norm = th.stack(grads).norm().item() / grad_scale if grads else 0.0
            return grad_norm, th.stack(params).norm().item()

    def master_params_to_state_dict(self, master_params):
        """The model's state dict with parameter values from master_params (e.g. an EMA copy)."""
        return master_params_to_state_dict(self.model, self.param_groups_and_shapes, master_params, self.use_fp16)

    def state_dict_to_master_params(self, state_dict):
        """Master parameters (laid out as this trainer's) holding a state dict's values."""
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)


def use_fp16_if_supported(model, use_fp16, device):
    """Convert model's torso to fp16 when asked and on CUDA; elsewhere keep float32 with one notice.

    The README flags say `--use_fp16 True`; fp16 convolutions are a CUDA feature, so on a CPU
    the same flags run in float32 instead of failing. Returns whether the model is now fp16.
    """
    if not use_fp16:
        return False
    if th.device(device).type != "cuda":
        logger.log(f"use_fp16: fp16 needs CUDA; running in float32 on {th.device(device).type}")
        return False
    model.convert_to_fp16()
    return True
