"""Flag defaults and factories that build models and diffusions from command-line flags.

Every `*_defaults()` dict is a set of flags (`--name value`); the `create_*` functions take
exactly those flags as keyword arguments, so `create_x(**args_to_dict(args, x_defaults().keys()))`
builds what a README flag string describes. The PixelAsParam flags (`pxp_defaults()`) are part of
every diffusion's flags and travel as one group, a `pixel_as_param.PxPConfig`: the factories take
them as `**pxp_flags`, so a new setting is a new PxPConfig field and nothing here changes.
"""

import argparse
import inspect

import torch.nn as nn

from . import gaussian_diffusion as gd
from .errors import UsageError
from .pixel_as_param import PxPConfig
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

# channel multipliers per level by image size, as in the published ImageNet models
_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def pxp_defaults():
    """Flags of how guided steps are taken (PixelAsParam: pxp_mode, dweight, cweight, pxp_optimizer,
    pxp_window, pxp_bound, guidance_window); together they make one `pixel_as_param.PxPConfig`."""
    return PxPConfig().flags()


def diffusion_defaults():
    """Flags of the diffusion process, including how guided steps are taken (PixelAsParam)."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
        **pxp_defaults(),
    )


def classifier_defaults():
    """Flags of the noisy classifier."""
    return dict(
        image_size=64,
        num_classes=NUM_CLASSES,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",  # 16
        classifier_use_scale_shift_norm=True,  # False
        classifier_resblock_updown=True,  # False
        classifier_pool="attention",
        classifier_channel_mult="",
    )


def model_and_diffusion_defaults():
    """Flags of the diffusion UNet and its process."""
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        num_classes=NUM_CLASSES,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults():
    """Flags of the noisy classifier and the process it is trained on."""
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    num_classes=NUM_CLASSES,
    **pxp_flags,
):
    """The UNet and the diffusion described by model_and_diffusion_defaults() flags.

    `pxp_mode="auto"` picks the paper's recipe for the model: cls_den when class-conditional,
    cls_den_div2 otherwise.
    """
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
    )
    diffusion = create_diffusion(
        learn_sigma=learn_sigma,
        diffusion_steps=diffusion_steps,
        noise_schedule=noise_schedule,
        timestep_respacing=timestep_respacing,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        class_cond=class_cond,
        **pxp_flags,
    )
    return model, diffusion


def parse_channel_mult(channel_mult, image_size, table=_CHANNEL_MULT):
    """Channel multipliers from a flag like "1,2,2,4", or the table's entry for image_size."""
    if channel_mult:
        return tuple(float(m) if "." in m else int(m) for m in str(channel_mult).split(","))
    if image_size not in table:
        sizes = ", ".join(map(str, sorted(table)))
        raise UsageError(f"no default channel_mult for image size {image_size} (known: {sizes}): pass --channel_mult, e.g. 1,2,2")
    return table[image_size]


def _attention_ds(attention_resolutions, image_size):
    """Downsampling factors from a list of resolutions like "32,16,8"."""
    if not attention_resolutions:
        return ()
    return tuple(image_size // int(res) for res in str(attention_resolutions).split(","))


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
):
    """The diffusion UNet described by the model flags."""
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    num_classes=NUM_CLASSES,
    classifier_channel_mult="",
    **pxp_flags,
):
    """The noisy classifier and the diffusion it is trained on (classifier_and_diffusion_defaults() flags)."""
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
        num_classes=num_classes,
        classifier_channel_mult=classifier_channel_mult,
    )
    diffusion = create_diffusion(
        learn_sigma=learn_sigma,
        diffusion_steps=diffusion_steps,
        noise_schedule=noise_schedule,
        timestep_respacing=timestep_respacing,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        **pxp_flags,
    )
    return classifier, diffusion


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    num_classes=NUM_CLASSES,
    classifier_channel_mult="",
):
    """The noisy classifier described by the classifier flags (64 channels per attention head)."""
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=_attention_ds(classifier_attention_resolutions, image_size),
        channel_mult=parse_channel_mult(classifier_channel_mult, image_size),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_model_and_diffusion_defaults():
    """Flags of the super-resolution UNet (large_size, small_size) and its process."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    names = set(inspect.signature(sr_create_model_and_diffusion).parameters) | set(pxp_defaults())
    return {k: v for k, v in res.items() if k in names}


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
    **pxp_flags,
):
    """The super-resolution UNet and its diffusion described by sr_model_and_diffusion_defaults() flags."""
    model = sr_create_model(
        large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
        attention_resolutions, num_heads, num_head_channels, num_heads_upsample, use_scale_shift_norm,
        dropout, resblock_updown, use_fp16, num_classes,
    )
    diffusion = create_diffusion(
        learn_sigma=learn_sigma,
        diffusion_steps=diffusion_steps,
        noise_schedule=noise_schedule,
        timestep_respacing=timestep_respacing,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        class_cond=class_cond,
        **pxp_flags,
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
):
    """The super-resolution UNet; small_size is implied by the low-resolution input."""
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=parse_channel_mult("", large_size, _SR_CHANNEL_MULT),
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


def create_diffusion(
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    class_cond=None,
    **pxp_flags,
):
    """The diffusion that diffusion_defaults() flags describe, e.g. a checkpoint's flags with a respacing:
    `create_diffusion(**{k: flags[k] for k in diffusion_defaults()})`. class_cond resolves pxp_mode auto."""
    return create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
        pxp=PxPConfig.from_flags(class_cond=class_cond, **pxp_flags),
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    pxp=None,
    **pxp_flags,
):
    """A (respaced) diffusion process; guided steps are taken as `pxp` (a PxPConfig) or the PixelAsParam
    flags (pxp_mode=..., see pxp_defaults()) say, ADM-G's plain steps by default."""
    if pxp is not None and pxp_flags:
        raise UsageError(f"pass pxp= or PixelAsParam flags ({', '.join(pxp_flags)}), not both")
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        pxp=pxp if pxp is not None else PxPConfig.from_flags(**pxp_flags),
    )


def randomize_zeroed_convs(net):
    """Give a network's zero-initialised convolutions (ADM's output layers) fresh random weights, in place.

    A network built from flags with seeded weights then depends on all its paths, as a trained one
    does, for timing and precision checks without a checkpoint. Returns net.
    """
    for module in net.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not module.weight.any():
            module.reset_parameters()
    return net


def add_dict_to_argparser(parser, default_dict):
    """Add a `--key` flag for every default; booleans parse True/False, None parses as str."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    """The values of the given flags as a dict."""
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """Parse a boolean flag value (yes/no, true/false, t/f, y/n, 1/0)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")
