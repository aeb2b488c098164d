"""``jaxconv train`` and ``jaxconv eval``."""
from __future__ import annotations

import sys


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    return int(parts[0]), int(parts[1])


def _add_data(p) -> None:
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist | synthetic | folder (with --data-dir) | an image-folder path")
    p.add_argument("--data-dir", help="where the data lives (Fashion-MNIST's IDX files, or the image-folder root)")
    p.add_argument("--image-size", type=_size, metavar="HxW", help="input size (default: the data's or the model's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"),
                   help="compute dtype; parameters and BatchNorm statistics stay float32 (float64: "
                        "everything in float64, for exact checks)")
    p.add_argument("--threads", type=int, default=2, help="grain loader threads")


def _add_distributed(p) -> None:
    p.add_argument("--coordinator", help="host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="number of processes (or JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="this process's id (or JAX_PROCESS_ID)")


def _enable_x64(args) -> None:
    if args.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)


def _train(args) -> int:
    from jaxconv.train.distributed import initialize

    _enable_x64(args)
    from jaxconv.train.loop import TrainConfig, TrainingDiverged, train

    initialize(args.coordinator, args.num_processes, args.process_id)
    out = args.out or f"runs/{args.model}-{args.data.strip('/').replace('/', '_')}"
    cfg = TrainConfig(
        model=args.model, data=args.data, data_dir=args.data_dir, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, decay_bn_bias=args.decay_bn_bias, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, milestones=tuple(args.milestones or ()), gamma=args.gamma,
        clip_norm=args.clip_norm, label_smoothing=args.label_smoothing, augment=args.augment,
        image_size=args.image_size, eval_crop=args.eval_crop, eval_every=args.eval_every, dtype=args.dtype,
        seed=args.seed, out=out, checkpoint_every=args.checkpoint_every, keep=args.keep, resume=args.resume,
        log_every=args.log_every, steps_per_call=args.steps_per_call, threads=args.threads, workers=args.workers, progress=not args.no_progress,
        stop_after=args.stop_after, devices=args.devices)
    if args.data == "synthetic":
        cfg.data_options = {"n": args.synthetic_size} if args.synthetic_size else {}
    try:
        result = train(cfg)
    except TrainingDiverged as e:
        print(f"jaxconv train: error: {e}", file=sys.stderr)
        return 1
    if result.test is not None:
        print(f"top1 {result.test['top1']:.4f} top5 {result.test['top5']:.4f}")
    return 0


def _eval(args) -> int:
    from jaxconv.train.distributed import initialize

    _enable_x64(args)
    from jaxconv.train.loop import evaluate

    initialize(args.coordinator, args.num_processes, args.process_id)
    r = evaluate(args.model, args.data, weights=args.weights, split=args.split, data_dir=args.data_dir,
                 batch_size=args.batch_size, crop=args.crop, dtype=args.dtype, image_size=args.image_size,
                 threads=args.threads)
    print(f"{args.model} on {args.data} {args.split}: {r['count']} images, loss {r['loss']:.4f}")
    print(f"top1 {r['top1']:.4f} top5 {r['top5']:.4f}")
    return 0


def register(sub) -> None:
    # kept in step with jaxconv.data.augment.RECIPES and jaxconv.train.optim (imported lazily)
    RECIPES = ("none", "flip", "crop-flip", "rrc", "alexnet")
    OPTIMIZERS, SCHEDULES = ("sgd", "nesterov", "adamw"), ("constant", "step", "cosine")

    p = sub.add_parser("train", help="train a model (data-parallel over every device and process)")
    p.add_argument("--model", required=True)
    _add_data(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, help="total steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over the devices")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--decay-bn-bias", action="store_true", help="also decay BatchNorm and bias parameters")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--milestones", type=float, nargs="*", help="epochs where the step schedule multiplies by --gamma")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--clip-norm", type=float, help="clip gradients to this global norm")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", default="none", choices=RECIPES)
    p.add_argument("--eval-crop", default="center", choices=("center", "ten"))
    p.add_argument("--eval-every", type=int, default=1, help="epochs between test evaluations (0: at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run directory (default runs/MODEL-DATA)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: every epoch)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-after", type=int, help="run at most this many steps now, checkpoint and exit")
    p.add_argument("--log-every", type=int, default=50, help="steps between metric fetches")
    p.add_argument("--steps-per-call", type=int, default=1,
                   help="train steps per jitted call, as one lax.scan (faster on a CPU, where each call "
                        "faults its buffers in afresh; calls still end at every log, epoch and checkpoint)")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes (0: threads only)")
    p.add_argument("--synthetic-size", type=int, help="records in the synthetic training set")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--devices", type=int, help="use only the first N devices (default: all)")
    _add_distributed(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="top-1/top-5 of a model's weights on a dataset")
    p.add_argument("--model", required=True)
    _add_data(p)
    p.add_argument("--weights", help="a save_variables file (default: the model's pretrained weights)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--crop", default="center", choices=("center", "ten"))
    _add_distributed(p)
    p.set_defaults(func=_eval)
