"""Train the CVAE on MNIST and write a checkpoint.

    python train.py                      # 10 epochs, batch 100, Adam 1e-3, latent 2 -> cvae.ckpt
    python train.py --resume             # continue the same run from its last per-epoch checkpoint

Under --run-dir: the per-epoch checkpoint (checkpoints/last.ckpt) and, per process, logs/version_N with a CSV log
and TensorBoard events (`tensorboard --logdir runs/cvae`).
"""
from __future__ import annotations

import inspect
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torchvision.utils import make_grid

from checkpoint import AtomicCheckpointIO, CheckpointError, safe_torch_load
from cli import DEFAULT_CKPT, DEFAULT_RUN_DIR, ArgParser, UsageError, bounded, check_data_dir, check_output_file, fail
from dataset import DEFAULT_DATA_DIR, TRAIN_SIZE, DataError, MNISTDataModule
from model import CVAE, LIKELIHOODS, LR_SCHEDULES, metric_names
from prior import PRIOR_KINDS, FitPrior

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def defaults(cls) -> dict:
    """The default of every constructor argument of `cls`: the recipe lives in the classes (CVAE, MNISTDataModule,
    FitPrior), and the flags' defaults are read from them, so the script and a notebook cannot drift apart."""
    return {name: p.default for name, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


MODEL, DATA, PRIOR = defaults(CVAE), defaults(MNISTDataModule), defaults(FitPrior)


def build_parser() -> ArgParser:
    p = ArgParser(description="Train a conditional VAE on MNIST.")
    add_recipe_flags(p)
    add_run_flags(p)
    return p


def add_recipe_flags(p: ArgParser) -> None:
    """What is trained, and how: the model, its objective and the optimisation."""
    g = p.add_argument_group("model and objective")
    g.add_argument("--latent-dim", type=bounded(int, 1), default=MODEL["latent_dim"], help="size of z")
    g.add_argument("--kl-weight", type=bounded(float, 0), default=MODEL["kl_weight"], help="beta: weight of the KL "
                   "term (0 = the original plain-MSE autoencoder)")
    # Without warm-up, MSE + KL often switches off one of the two latent dimensions early in training
    # (README: Sample quality; bench/seeds.py measures the recipe on three seeds).
    g.add_argument("--kl-warmup-epochs", type=bounded(float, 0), default=MODEL["kl_warmup_epochs"],
                   help="ramp beta linearly from 0 over this many epochs, per step (0 = off)")
    g.add_argument("--free-bits", type=bounded(float, 0), default=MODEL["free_bits"],
                   help="minimum KL per latent dimension in nats, in the training objective (0 = off)")
    g.add_argument("--likelihood", choices=LIKELIHOODS, default=MODEL["likelihood"],
                   help="p(x | z, y): gaussian = summed squared error on grey images (the original's); bernoulli = "
                        "summed binary cross-entropy on binarized images, drawn afresh for every training batch")
    g.add_argument("--importance-samples", type=bounded(int, 1, 1000), default=MODEL["importance_samples"],
                   help="K samples of z per image in the training loss: K > 1 trains the K-sample importance-weighted "
                        "bound (IWAE), tighter than the ELBO, at K decoder passes per image (1 = the ELBO, with its "
                        "closed-form KL). test.py --iw-samples only scores a trained model with such a bound")
    g.add_argument("--dropout", type=bounded(float, 0, 0.99), default=MODEL["dropout"],
                   help="dropout after the hidden blocks (0 = none, as in the VAE papers)")
    g.add_argument("--prior", choices=(*PRIOR_KINDS, "none"), default=PRIOR["kind"],
                   help="after training, fit a density to the training codes for sampling: a Gaussian mixture per "
                        "digit (per-class) or for all digits (global), a flow conditioned on the digit, or the codes "
                        "themselves, drawn at random (codes; prior.py)")
    g.add_argument("--prior-components", type=bounded(int, 1), default=PRIOR["components"],
                   help="Gaussians in a per-class or global mixture")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=bounded(int, 1), default=10, help="number of epochs")
    g.add_argument("--batch-size", type=bounded(int, 1), default=DATA["batch_size"], help="batch size (per process)")
    g.add_argument("--lr", type=bounded(float, 0, low_open=True), default=MODEL["lr"],
                   help="Adam's learning rate: the rate throughout (constant), the peak (one-cycle) or the start "
                        "(cosine)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=MODEL["lr_schedule"],
                   help="the rate over the run, step by step: constant; one-cycle (from lr/25 up to lr over the first "
                        "30%% of the steps, then down to lr/25e4); cosine (from lr down to 0)")
    g.add_argument("--seed", type=bounded(int, 0), default=0, help="random seed (weights, split, shuffling)")


def add_run_flags(p: ArgParser) -> None:
    """Where the data comes from, where the run goes, and what it runs on."""
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where MNIST is (or is written)")
    g.add_argument("--val-size", type=bounded(int, 1, TRAIN_SIZE - 1), default=DATA["val_size"],
                   help="validation images held out of the 60k training set")
    g.add_argument("--train-size", type=bounded(int, 1), default=None,
                   help="use only this many training images (quick experiments)")
    g = p.add_argument_group("output")
    g.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="final checkpoint")
    g.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                   help="per-epoch checkpoint (checkpoints/last.ckpt) and logs (CSV, TensorBoard)")
    g.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.ckpt")
    g.add_argument("--keep-every", type=bounded(int, 0), default=0,
                   help="also keep every Nth epoch's checkpoint as RUN_DIR/checkpoints/epoch=E.ckpt, E counted from 1 "
                        "(0 = only last.ckpt), e.g. to score a long run at several points")
    g = p.add_argument_group("hardware (passed to the Lightning Trainer)")
    g.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="device type")
    g.add_argument("--devices", default="auto", help="number of devices, a list like 0,1, or auto")
    g.add_argument("--strategy", default="auto", help="e.g. ddp, ddp_spawn, auto")
    g.add_argument("--num-nodes", type=bounded(int, 1), default=1, help="machines for multi-node training")
    g.add_argument("--precision", default="32-true", help="e.g. 32-true, bf16-mixed, 16-mixed")
    g.add_argument("--num-threads", type=bounded(int, 1), default=None,
                   help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder and decoder (needs a C++ compiler on CPU; bench/README.md)")
    g = p.add_argument_group("debugging")
    g.add_argument("--limit-train-batches", type=bounded(int, 1), default=None,
                   help="train on this many batches per epoch")
    g.add_argument("--limit-val-batches", type=bounded(int, 0), default=None,
                   help="validate on this many batches per epoch")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_args(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    try:
        check_data_dir(args.data_dir)
        check_output_file(args.ckpt, "checkpoint")
        check_output_file(last_checkpoint(args.run_dir), "run dir")
        if args.importance_samples > 1 and (args.free_bits > 0 or args.kl_weight == 0):
            raise UsageError(f"--importance-samples {args.importance_samples} weighs whole samples of z: it takes "
                             f"neither --free-bits nor --kl-weight 0")
        if args.train_size is not None and args.train_size > TRAIN_SIZE - args.val_size:
            raise UsageError(f"--train-size {args.train_size} exceeds the {TRAIN_SIZE - args.val_size} training images "
                             f"left after --val-size {args.val_size}")
        if args.resume and not last_checkpoint(args.run_dir).is_file():
            raise UsageError(f"--resume: no checkpoint at {last_checkpoint(args.run_dir)}; "
                             f"start a run without --resume")
    except UsageError as err:
        fail(str(err), code=2)
    return args


def last_checkpoint(run_dir: Path) -> Path:
    """The per-epoch checkpoint of a run, the one --resume continues from."""
    return run_dir / "checkpoints" / "last.ckpt"


def check_resumable(checkpoint: dict, model, path: Path, epochs: int) -> None:
    """Raise CheckpointError unless `checkpoint` is a per-epoch checkpoint of a run with this model's settings (and,
    under a learning-rate schedule, these `epochs`, which the schedule spans). Lightning would fail deep inside fit (a
    size-mismatch traceback, a schedule stepped past its end), or quietly keep the old learning rate."""
    if not {"epoch", "loops", "optimizer_states"} <= checkpoint.keys():
        raise CheckpointError(f"{path} holds no training state (epoch, loops, optimizer); only a per-epoch "
                              f"checkpoint written by train.py can be resumed")
    saved = checkpoint.get("hyper_parameters")
    saved = saved if isinstance(saved, dict) else {}
    # A hyper-parameter newer than the checkpoint had its default then.
    was = {name: saved.get(name, MODEL.get(name)) for name in model.hparams}
    differ = [f"{name} {was[name]!r} in the checkpoint, {value!r} now" for name, value in model.hparams.items()
              if was[name] != value]
    if differ:
        raise CheckpointError(f"{path} was trained with other settings ({'; '.join(differ)}); resume with the "
                              f"flags of the original run")
    planned = checkpoint.get("max_epochs")
    if model.hparams.lr_schedule != "constant" and planned != epochs:
        raise CheckpointError(f"{path} follows a {model.hparams.lr_schedule} learning-rate schedule over {planned} "
                              f"epochs; resume with --epochs {planned}")


class RNGState(Callback):
    """Saves the global torch RNG in per-epoch checkpoints and restores it on --resume, so an interrupted run
    continues with the same dropout and z noise as an uninterrupted one."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class RunLength(Callback):
    """Writes the run's --epochs into its checkpoints as "max_epochs": a learning-rate schedule spans them, so
    --resume must keep them (check_resumable)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["max_epochs"] = trainer.max_epochs


class EpochSummary(Callback):
    """One line per epoch: the train and validation terms (epoch means, from trainer.callback_metrics) and the time
    the epoch took. Lightning collects what the module logs at an epoch's end only after the callbacks' epoch-end
    hooks have run, so the line for an epoch is printed when the next one starts, or when training ends."""

    def __init__(self) -> None:
        self.start = 0.0
        self.ended: tuple[int, float] | None = None  # (epoch, seconds) of a finished epoch not yet printed

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.report(trainer, pl_module)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ended = (trainer.current_epoch, time.perf_counter() - self.start)

    def on_train_end(self, trainer, pl_module) -> None:
        self.report(trainer, pl_module)

    def report(self, trainer, pl_module) -> None:
        if self.ended is None or not trainer.is_global_zero:
            return
        (epoch, seconds), self.ended = self.ended, None
        m, k = trainer.callback_metrics, pl_module.hparams.importance_samples
        labels = {name: name for name in metric_names("train", "val")}
        if k > 1:  # the training loss is the negative K-sample bound, not the ELBO that validation reports
            labels["train_loss"] = f"train_loss (-{k}-sample bound)"
        parts = [f"{label} {float(m[name]):.2f}" for name, label in labels.items() if name in m]
        print(f"epoch {epoch + 1}/{trainer.max_epochs}: {', '.join(parts)} ({seconds:.2f}s)", flush=True)


class SampleGrid(Callback):
    """Every epoch, a grid of samples to TensorBoard: row k holds `per_digit` samples of digit k, decoded from codes
    z ~ N(0, I) drawn once from `seed`, so the same codes are decoded every epoch (and after --resume) and the
    grid shows how the decoder changes."""

    def __init__(self, seed: int, per_digit: int = 10) -> None:
        self.seed, self.per_digit = seed, per_digit

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is None or not trainer.is_global_zero:
            return
        labels = torch.arange(pl_module.hparams.num_classes).repeat_interleave(self.per_digit)
        z = torch.randn(len(labels), pl_module.hparams.latent_dim, generator=torch.Generator().manual_seed(self.seed))
        images = pl_module.sample(labels, z=z)  # (digits * per_digit, 1, 28, 28), eval mode; no global RNG used
        grid = make_grid(images.cpu(), nrow=self.per_digit, padding=2, pad_value=1.0)
        tensorboard.experiment.add_image("samples_by_digit", grid, global_step=trainer.global_step)
        tensorboard.save()  # flushed now: ModelCheckpoint, the last callback to run, then saves the epoch


class KeepEvery(Callback):
    """Every `every` epochs, the weights as FOLDER/epoch=E.ckpt (E counted from 1, as the epoch lines count; no
    optimizer state, no fitted prior), so that one long run can be scored at several points of its training."""

    def __init__(self, folder: Path, every: int) -> None:
        self.folder, self.every = folder, every

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after the epoch's validation
        done = trainer.current_epoch + 1
        if done % self.every == 0:
            trainer.save_checkpoint(self.folder / f"epoch={done}.ckpt", weights_only=True)  # rank 0 writes


def build_loggers(run_dir: Path) -> list:
    """A CSV log and TensorBoard event files side by side in RUN_DIR/logs/version_N, a new N for each process (a
    resumed run continues in the next version; test.py joins them into one curve)."""
    csv = CSVLogger(save_dir=run_dir, name="logs")
    # csv.version picks N without creating the folder, so both loggers agree on it.
    return [csv, TensorBoardLogger(save_dir=run_dir, name="logs", version=csv.version, default_hp_metric=False)]


def build_trainer(args, callbacks: list[Callback] | None = None) -> pl.Trainer:
    # Every epoch overwrites checkpoints/last.ckpt (the one "top-k" file, no monitor). save_last=True with
    # save_top_k=0 would not do: Lightning 2.6 then writes last.ckpt only when training ends, too late to resume.
    last = last_checkpoint(args.run_dir)
    checkpoint = ModelCheckpoint(dirpath=last.parent, filename=last.stem, save_top_k=1,
                                 enable_version_counter=False)
    keep = [KeepEvery(last.parent, args.keep_every)] if args.keep_every else []
    # The bar is redrawn at every refresh; every 50 steps is still several times a second.
    progress = [] if args.no_progress else [TQDMProgressBar(refresh_rate=50)]
    prior = [] if args.prior == "none" else [FitPrior(args.prior, args.prior_components, args.seed)]
    return pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, num_nodes=args.num_nodes,
        precision=args.precision,
        logger=build_loggers(args.run_dir),
        callbacks=[checkpoint, *keep, RNGState(), RunLength(), EpochSummary(), SampleGrid(args.seed), *prior,
                   *(callbacks or []), *progress],
        plugins=[AtomicCheckpointIO()],
        # The data module shards its batch sampler across processes itself (see dataset.BatchIndexSampler).
        use_distributed_sampler=False,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        enable_progress_bar=not args.no_progress, enable_model_summary=False,
    )


def build_model(args) -> CVAE:
    """The CVAE that train.py's flags describe."""
    model = CVAE(latent_dim=args.latent_dim, dropout=args.dropout, lr=args.lr, kl_weight=args.kl_weight,
                 kl_warmup_epochs=args.kl_warmup_epochs, free_bits=args.free_bits, likelihood=args.likelihood,
                 lr_schedule=args.lr_schedule, importance_samples=args.importance_samples)
    if args.compile:
        # In place, so the state_dict keys (and checkpoints) are the same as without compiling.
        model.encoder.compile()
        model.decoder.compile()
    return model


def build_data(args, device: torch.device | None = None) -> MNISTDataModule:
    """MNIST as train.py's flags describe it (binarized or grey as the model scores images: the data module follows
    the model). On CUDA the data set is moved to the device once; elsewhere batches stay in host memory."""
    on_gpu = device is not None and device.type == "cuda"
    return MNISTDataModule(args.data_dir, batch_size=args.batch_size, val_size=args.val_size, seed=args.seed,
                           train_size=args.train_size, device=device if on_gpu else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Lightning 2.6's own code trips this torch deprecation warning on every run; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    try:
        trainer = build_trainer(args)
    except Exception as err:  # noqa: BLE001  Lightning reports bad settings as ValueError, TypeError,
        # MisconfigurationException (no such GPU, bad --devices) or ImportError (--accelerator tpu without torch_xla)
        fail(f"cannot set up the trainer: {' '.join(str(err).split())}", code=2)
    cores = os.cpu_count() or 1
    if trainer.strategy.root_device.type == "cpu" and trainer.num_devices > cores:
        # Each CPU "device" is a whole training process; more than the cores just exhausts memory.
        fail(f"--devices {args.devices} on CPU would start {trainer.num_devices} processes on {cores} cores; "
             f"use at most {cores}", code=2)
    device = trainer.strategy.root_device
    data = build_data(args, device)
    model = build_model(args)
    if trainer.is_global_zero:
        print(f"Device: {device} ({trainer.num_devices} device(s) x {trainer.num_nodes} node(s), "
              f"precision {args.precision}, {torch.get_num_threads()} CPU threads)", flush=True)

    ckpt_path = None
    if args.resume:
        ckpt_path = last_checkpoint(args.run_dir)
        try:
            resumed = safe_torch_load(ckpt_path)
            check_resumable(resumed, model, ckpt_path, args.epochs)
            done = resumed["epoch"] + 1
        except (CheckpointError, KeyError) as err:
            fail(f"cannot resume: {err}")
        print(f"Resuming from {ckpt_path} (epoch {done} done)", flush=True)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        finish(trainer, model, data, args)
    except DataError as err:
        fail(str(err))
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning turns Ctrl-C inside fit and test into a graceful shutdown followed by sys.exit(1); between
        # and after them (the final save) it arrives as a plain KeyboardInterrupt.
        if isinstance(err, SystemExit) and not trainer.interrupted:
            raise
        if trainer.is_global_zero:
            finished = trainer.current_epoch >= args.epochs  # stopped in the prior fit, the test or the final save
            print(interrupted_hint(args, sys.argv[1:] if argv is None else argv, finished), file=sys.stderr)
        return 130
    return 0


def finish(trainer: pl.Trainer, model: CVAE, data: MNISTDataModule, args) -> None:
    """After training (and the prior fit, prior.FitPrior): report the test metrics and write the final checkpoint."""
    # The test terms go to TensorBoard only: new columns make Lightning's CSVLogger rewrite metrics.csv in place,
    # and a crash in the middle of that rewrite would lose the whole training log.
    trainer.loggers = [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]
    trainer.test(model, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        loss, recon, kl = (float(trainer.callback_metrics[name]) for name in metric_names("test"))
        recon_is = (f"MSE per pixel {recon / model.image_dim:.4f}" if model.hparams.likelihood == "gaussian"
                    else "binary cross-entropy, nats")
        print(f"test: loss {loss:.2f}, recon {recon:.2f} ({recon_is}), kl {kl:.2f}")
    # Model weights, hyper-parameters and the fitted prior; no optimizer state (resume uses last.ckpt).
    trainer.save_checkpoint(args.ckpt, weights_only=True)  # atomic (AtomicCheckpointIO); rank 0 writes
    if trainer.is_global_zero:
        print(f"Wrote {args.ckpt}")


def interrupted_hint(args, argv: list[str], finished: bool) -> str:
    """What to run after Ctrl-C: the same flags again (the batch size, data and epochs of a run are not stored in
    its checkpoint), with --resume once an epoch is saved. Resuming a finished run skips straight to the prior
    fit, the test pass and the final save."""
    saved = last_checkpoint(args.run_dir)
    flags = [a for a in argv if a != "--resume"]
    if not saved.exists():
        return (f"Interrupted before the first epoch finished; start again with: "
                f"python train.py {shlex.join(flags)}".rstrip())
    if finished:
        where = (f"Interrupted after training finished, before {args.ckpt} was written; the trained weights are "
                 f"in {saved}.")
    else:
        where = f"Interrupted: the last finished epoch is saved in {saved}."
    return f"{where} Continue with: python train.py {shlex.join([*flags, '--resume'])}"


if __name__ == "__main__":
    sys.exit(main())
