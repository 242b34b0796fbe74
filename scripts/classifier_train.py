"""Train a noisy classifier, on images diffused to random timesteps, for classifier guidance (MPI data-parallel)."""

import torch as th
import torch.nn.functional as F

from guided_diffusion import dist_util, harness, logger
from guided_diffusion.checkpoints import make_sidecar
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import (
    args_to_dict,
    classifier_and_diffusion_defaults,
    classifier_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.train_scripts import setup, train
from guided_diffusion.train_util import TrainLoop, log_loss_dict


class ClassifierTrainLoop(TrainLoop):
    """TrainLoop whose loss is the cross-entropy of the labels of noised images, with validation batches.

    With `noised` the images are `diffusion.q_sample`d at timesteps from the schedule sampler
    (its importance weights unused, as in the original); without, they stay clean at t = 0.
    The learning rate decays linearly to zero over the run only with `anneal_lr`.
    """

    def __init__(self, *, noised, anneal_lr, val_data, eval_interval, **kwargs):
        super().__init__(**kwargs)
        self.noised = noised
        self.anneal_lr = anneal_lr
        self.val_data = val_data
        self.eval_interval = eval_interval

    def compute_loss(self, micro, micro_cond):
        """The microbatch's share of the batch's mean cross-entropy."""
        return self.classifier_loss(self.ddp_model, micro, micro_cond["y"], "train") * len(micro) / self.batch_size

    def classifier_loss(self, model, images, labels, prefix):
        """Mean cross-entropy of model on the (noised) images; logs it and the top-1/top-5 accuracy by timestep quartile."""
        if self.noised:
            t, _ = self.schedule_sampler.sample(images.shape[0], dist_util.dev())
            images = self.diffusion.q_sample(images, t)
        else:
            t = th.zeros(images.shape[0], dtype=th.long, device=dist_util.dev())
        logits = model(images, timesteps=t)
        loss = F.cross_entropy(logits, labels, reduction="none")
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
        metrics = {f"{prefix}_loss": loss.detach(), f"{prefix}_acc@1": hits[:, 0].float(), f"{prefix}_acc@5": hits.any(-1).float()}
        log_loss_dict(self.diffusion, t, metrics)
        return loss.mean()

    def run_step(self, batch, cond):
        """A training step, and every eval_interval steps the loss and accuracy of a validation batch."""
        super().run_step(batch, cond)
        if self.val_data is not None and self.global_step % self.eval_interval == 0:
            val_batch, val_cond = next(self.val_data)
            self.model.eval()
            with th.no_grad():
                self.classifier_loss(self.model, val_batch.to(dist_util.dev()), val_cond["y"].to(dist_util.dev()), "val")
            self.model.train()

    def _anneal_lr(self):
        if self.anneal_lr:
            super()._anneal_lr()


def create_argparser():
    """The script's flags, grouped, with help."""
    defaults = dict(
        data_dir="",
        val_data_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
        ema_rate="0.9999",  # added: EMA copies as in image_train.py
        random_crop=True,  # added: the original always crops training images at random
        random_flip=True,  # added: ... and mirrors half of them
    )
    return harness.create_argparser(__doc__, defaults, classifier_and_diffusion_defaults(), context="train")


def main():
    """Build the classifier and diffusion from flags and train on data_dir (validating on val_data_dir)."""
    args = create_argparser().parse_args()
    setup()
    data_flags = dict(batch_size=args.batch_size, image_size=args.image_size, class_cond=True)
    data = load_data(data_dir=args.data_dir, random_crop=args.random_crop, random_flip=args.random_flip, **data_flags)
    val_data = load_data(data_dir=args.val_data_dir, random_flip=False, **data_flags) if args.val_data_dir else None
    logger.log("creating classifier and diffusion...")
    model, diffusion = create_classifier_and_diffusion(**args_to_dict(args, classifier_and_diffusion_defaults().keys()))
    train(
        args,
        model,
        diffusion,
        data,
        make_sidecar("classifier", args, classifier_defaults()),
        loop_class=ClassifierTrainLoop,
        lr_anneal_steps=args.iterations,
        use_fp16=args.classifier_use_fp16,
        noised=args.noised,
        anneal_lr=args.anneal_lr,
        val_data=val_data,
        eval_interval=args.eval_interval,
    )


if __name__ == "__main__":
    harness.run_script(main)
