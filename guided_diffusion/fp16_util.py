"""Mixed-precision helpers: fp16 conversion of the networks and an fp16 trainer with loss scaling."""

import numpy as np
import torch as th
import torch.nn as nn

from . import logger

INITIAL_LOG_LOSS_SCALE = 20.0


def convert_module_to_f16(module):
    """Convert a convolution's weight and bias to float16 (other layers stay float32)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Convert a convolution's weight and bias back to float32."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


def make_master_params(model_params):
    """Float32 copies of the model's parameters, which the optimizer updates."""
    return [nn.Parameter(p.detach().float().clone()) for p in model_params]


def model_grads_to_master_grads(model_params, master_params):
    """Copy the model's (possibly fp16) gradients into the float32 master parameters."""
    for model_p, master_p in zip(model_params, master_params):
        master_p.grad = param_grad_or_zeros(model_p).float()


def master_params_to_model_params(model_params, master_params):
    """Copy the master parameters' values back into the model."""
    for model_p, master_p in zip(model_params, master_params):
        model_p.detach().copy_(master_p.detach())


def master_params_to_state_dict(model, master_params):
    """The model's state dict with parameters taken from the float32 master copies."""
    state_dict = model.state_dict()
    for (name, _), master_p in zip(model.named_parameters(), master_params):
        state_dict[name] = master_p.detach()
    return state_dict


def state_dict_to_master_params(model, state_dict):
    """Float32 master parameters read from a state dict, in the model's parameter order."""
    return [nn.Parameter(state_dict[name].detach().float().clone()) for name, _ in model.named_parameters()]


def zero_grad(model_params):
    """Drop the gradients of the given parameters."""
    for p in model_params:
        p.grad = None


def param_grad_or_zeros(param):
    """A parameter's gradient, or zeros if it has none (unused in this step)."""
    return param.grad.detach() if param.grad is not None else th.zeros_like(param)


class MixedPrecisionTrainer:
    """Backward and optimizer steps for a model, in float32 or fp16 with dynamic loss scaling.

    In fp16 the model computes in half precision while the optimizer updates float32 master
    copies; the loss scale grows slowly and halves whenever a gradient overflows.
    """

    def __init__(self, *, model, use_fp16=False, fp16_scale_growth=1e-3, initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.lg_loss_scale = initial_lg_loss_scale
        if use_fp16:
            self.master_params = make_master_params(self.model_params)
            model.convert_to_fp16()

    def zero_grad(self):
        zero_grad(self.model_params)

    def backward(self, loss):
        """Backpropagate loss, scaled by 2^lg_loss_scale in fp16."""
        if self.use_fp16:
            (loss * 2**self.lg_loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt):
        """Take an optimizer step; in fp16 skip it (and shrink the scale) on overflow. Returns success."""
        if not self.use_fp16:
            grad_norm, param_norm = self._compute_norms()
            logger.logkv_mean("grad_norm", grad_norm)
            logger.logkv_mean("param_norm", param_norm)
            opt.step()
            return True
        model_grads_to_master_grads(self.model_params, self.master_params)
        grad_norm, param_norm = self._compute_norms(grad_scale=2**self.lg_loss_scale)
        if not np.isfinite(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_grad(self.master_params)
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        for p in self.master_params:
            p.grad.mul_(1.0 / 2**self.lg_loss_scale)
        opt.step()
        zero_grad(self.master_params)
        master_params_to_model_params(self.model_params, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _compute_norms(self, grad_scale=1.0):
        """Global L2 norms of the (unscaled) gradients and of the parameters."""
        grads = [p.grad.float().norm() for p in self.master_params if p.grad is not None]
        params = [p.detach().float().norm() for p in self.master_params]
        grad_norm = th.stack(grads).norm().item() / grad_scale if grads else 0.0
        return grad_norm, th.stack(params).norm().item()

    def master_params_to_state_dict(self, master_params):
        return master_params_to_state_dict(self.model, master_params)

    def state_dict_to_master_params(self, state_dict):
        return state_dict_to_master_params(self.model, state_dict)


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
