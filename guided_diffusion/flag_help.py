"""The help table: one line of help and a group for every flag of the sampling and training scripts.

Keys are flag names; a flag that means something else in one kind of script also has an entry
"<context>/<name>" (contexts: train, image_nll, super_res_sample, prepare_digits). A test checks
that every flag of every script has an entry, so a new flag cannot ship without help.
"""

GROUPS = ("model", "classifier", "diffusion", "sampling", "guidance", "PixelAsParam", "speed", "output", "training", "data")

HELP = {
    # model
    "model_path": ("model", "diffusion model checkpoint (.pt or .safetensors); its flags come from <file>.json or the official checkpoint it matches"),
    "image_size": ("model", "image side in pixels"),
    "num_channels": ("model", "channels of the UNet's first level"),
    "num_res_blocks": ("model", "residual blocks per level"),
    "num_heads": ("model", "attention heads (when --num_head_channels is -1)"),
    "num_heads_upsample": ("model", "attention heads in the decoder (-1: as --num_heads)"),
    "num_head_channels": ("model", "channels per attention head (-1: a fixed --num_heads instead)"),
    "attention_resolutions": ("model", "feature-map sides that get self-attention, comma-separated"),
    "channel_mult": ("model", "channel multiplier of each level, comma-separated (empty: the published one for --image_size)"),
    "dropout": ("model", "dropout rate in the residual blocks"),
    "class_cond": ("model", "the model takes class labels"),
    "num_classes": ("model", "number of classes of the labels"),
    "use_checkpoint": ("model", "gradient checkpointing: less memory in training, slower"),
    "use_scale_shift_norm": ("model", "the timestep embedding scales and shifts the normalised activations"),
    "resblock_updown": ("model", "residual blocks do the up- and downsampling"),
    "use_fp16": ("model", "run the network in float16 (CUDA only; float32 on a CPU)"),
    "use_new_attention_order": ("model", "split heads before q, k, v (the 64x64 model's attention order)"),
    "large_size": ("model", "side of the upsampler's output in pixels"),
    "small_size": ("model", "side of the upsampler's input in pixels"),
    # classifier
    "classifier_use_fp16": ("classifier", "run the classifier in float16 (CUDA only)"),
    "classifier_width": ("classifier", "channels of the classifier's first level"),
    "classifier_depth": ("classifier", "residual blocks per level of the classifier"),
    "classifier_attention_resolutions": ("classifier", "feature-map sides with self-attention in the classifier, comma-separated"),
    "classifier_use_scale_shift_norm": ("classifier", "the classifier's timestep embedding scales and shifts its activations"),
    "classifier_resblock_updown": ("classifier", "residual blocks do the classifier's downsampling"),
    "classifier_pool": ("classifier", "how the classifier pools its features: attention, adaptive, spatial or spatial_v2"),
    "classifier_channel_mult": ("classifier", "channel multiplier of each classifier level, comma-separated (empty: by --image_size)"),
    # diffusion
    "learn_sigma": ("diffusion", "the model also predicts the step variances (6 output channels)"),
    "diffusion_steps": ("diffusion", "steps T of the trained diffusion process"),
    "noise_schedule": ("diffusion", "beta schedule: linear or cosine"),
    "timestep_respacing": ("diffusion", "sample with fewer steps: a count (250), counts per section (10,20) or ddimN (empty: all T)"),
    "use_kl": ("diffusion", "train on the variational bound instead of the noise MSE"),
    "predict_xstart": ("diffusion", "the model predicts x0 instead of the noise"),
    "rescale_timesteps": ("diffusion", "the model sees timesteps scaled to 0..1000"),
    "rescale_learned_sigmas": ("diffusion", "weigh the variance term of the loss as the bound does"),
    # sampling
    "num_samples": ("sampling", "how many samples to make"),
    "super_res_sample/num_samples": ("sampling", "how many samples (0: one per base sample; more cycle through them)"),
    "batch_size": ("sampling", "samples per batch on each rank (with --seed the samples do not depend on it)"),
    "sampler": ("sampling", "ddpm, ddim, dpmpp_2m (DPM-Solver++ 2M, an ODE solver) or dpmpp_2m_sde (its SDE variant); each takes one network evaluation a step, so --timestep_respacing 20 is 20 calls"),
    "use_ddim": ("sampling", "take DDIM steps instead of DDPM steps (the same as --sampler ddim)"),
    "eta": ("sampling", "DDIM's noise level, 0 for deterministic steps (needs --sampler ddim)"),
    "x0_threshold": ("sampling", "how the DPM-Solver++ samplers bound a guided step's x0 prediction: none, clip (to [-1, 1]) or dynamic (Imagen's per-sample thresholding)"),
    "clip_denoised": ("sampling", "clip each step's x0 prediction to [-1, 1]"),
    "seed": ("sampling", "sample i depends only on (seed, i), whatever the ranks, batch size or restarts (none: unseeded)"),
    "labels": ("sampling", "class of sample i: random (seeded), cycle (i mod num_classes) or a comma list of class ids, repeated (e.g. 3 or 1,7)"),
    "batch_invariant": ("sampling", "with --seed, run the networks one sample at a time so that results do not depend on the batch size"),
    "base_samples": ("sampling", "the .npz to upsample: low-resolution uint8 images (arr_0) and their labels (arr_1)"),
    # guidance
    "classifier_path": ("guidance", "noisy classifier checkpoint that guides each step; its flags come from <file>.json or the official one"),
    "classifier_scale": ("guidance", "guidance scale s: each step follows s * grad log p(y | x_t) (0: no guidance)"),
    "cond_model_path": ("guidance", "class-conditional model for classifier-free guidance (--model_path is the unconditional one)"),
    "cond_model_scale": ("guidance", "classifier-free guidance weight w: eps = (1 + w) eps_cond - w eps_uncond"),
    "guidance_window": ("guidance", "lo,hi: guidance acts only at steps with lo <= t/T < hi"),
    # PixelAsParam
    "pxp_mode": ("PixelAsParam", "how a guided step combines its directions: none (ADM-G), cls_den, cls_den_div, cls_den_div2, or auto (cls_den for a class-conditional model, else cls_den_div2)"),
    "dweight": ("PixelAsParam", "weight of the corrections to the sampler's own directions (den, div); 0: one-sided projection"),
    "cweight": ("PixelAsParam", "weight of the corrections to the guidance direction"),
    "pxp_optimizer": ("PixelAsParam", "smooth the guidance direction across steps: sgd (no smoothing, the paper's), momentum or adam"),
    "pxp_window": ("PixelAsParam", "lo,hi: project only at steps with lo <= t/T < hi (plain ADM-G steps elsewhere)"),
    "pxp_bound": ("PixelAsParam", "largest coefficient of a projection's correction to den or div (inf: unbounded, the paper's rule)"),
    "pxp_stats": ("output", "write each guided step's PixelAsParam statistics to this JSON file, and a plot beside it"),
    # speed
    "autocast": ("speed", "run the networks under torch.autocast in bf16 or fp16 (empty: float32)"),
    "channels_last": ("speed", "feed the networks channels-last tensors"),
    "compile": ("speed", "torch.compile the networks"),
    # output
    "output": ("output", "folder or .npz path of the samples (empty: $OPENAI_LOGDIR, else samples/<script>-<hash of the flags>/, where the same command continues)"),
    "grid_size": ("output", "PNG grid of the first NxN samples beside the .npz (0: none)"),
    # training
    "schedule_sampler": ("training", "how training timesteps are drawn: uniform or loss-second-moment"),
    "lr": ("training", "learning rate of AdamW"),
    "weight_decay": ("training", "AdamW's weight decay"),
    "lr_anneal_steps": ("training", "decay the learning rate linearly to 0 over this many steps, then stop (0: train until stopped)"),
    "train/batch_size": ("training", "images per rank in each step"),
    "microbatch": ("training", "split each batch into parts of this many images (-1: no split)"),
    "ema_rate": ("training", "decay rates of the EMA weights, comma-separated (one EMA checkpoint each)"),
    "log_interval": ("training", "steps between logged averages"),
    "save_interval": ("training", "steps between checkpoints"),
    "resume_checkpoint": ("training", "model checkpoint to resume from (empty: the newest in the log folder)"),
    "fp16_scale_growth": ("training", "growth of the fp16 loss scale per step"),
    "iterations": ("training", "training steps"),
    "anneal_lr": ("training", "decay the learning rate linearly to 0 over --iterations"),
    "noised": ("training", "train on images diffused to random timesteps (a noisy classifier, for guidance)"),
    "eval_interval": ("training", "steps between validation batches"),
    # data
    "data_dir": ("data", "folder of training images (a name's prefix before the first _ is its class)"),
    "val_data_dir": ("data", "folder of validation images (empty: no validation)"),
    "random_flip": ("data", "mirror half of the training images"),
    "random_crop": ("data", "crop the training images at random (else at the centre)"),
    # image_nll.py
    "image_nll/data_dir": ("data", "folder of images to evaluate (read in file order, unflipped)"),
    "image_nll/num_samples": ("data", "how many images to evaluate"),
    "image_nll/batch_size": ("data", "images per rank in each batch"),
    "image_nll/clip_denoised": ("diffusion", "clip the x0 predictions to [-1, 1] in the bound"),
    # prepare_digits.py
    "prepare_digits/out_dir": ("output", "folder for train/, held_out/ and their .npz batches"),
    "prepare_digits/image_size": ("data", "side of the written images (8 is native; larger sizes are upscaled)"),
    "prepare_digits/resample": ("data", "upscaling filter: nearest, bilinear or bicubic"),
    "prepare_digits/seed": ("data", "seed of the stratified train/held-out split"),
}


def lookup(name, context=None):
    """(group, help) of a flag in a context, or None when the table has no entry for it."""
    return HELP.get(f"{context}/{name}") or HELP.get(name)


def group_of(name, context=None):
    """The help group of a flag ("other" when the table has no entry for it)."""
    return (lookup(name, context) or ("other", ""))[0]


def group_rank(title):
    """Where a group comes in --help and in the settings banner: GROUPS' order, unknown groups last."""
    return GROUPS.index(title) if title in GROUPS else len(GROUPS)
