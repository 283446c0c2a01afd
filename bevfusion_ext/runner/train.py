"""BEVFusion's tools/train.py + mmdet3d.apis.train_model, on CPU or GPU, with strict loading and real custom_hooks."""

from __future__ import annotations

import copy
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from mmcv import Config
from mmcv.runner import DistSamplerSeedHook, Fp16OptimizerHook, OptimizerHook, build_optimizer
from mmcv.utils import get_logger
from torchpack import distributed as tp_dist

from ..compression import checkpoint_weights, load_state_dict_strict, read_checkpoint
from ..compression.recipe import (
    CompressionRecipe,
    PruningRecipe,
    RecipeError,
    check_groups,
    check_structure,
    parse_recipe,
)
from ..compression.state import empty_state, restore_architecture
from .builder import (
    build_dataloader,
    build_dataset,
    build_model,
    check_registered,
    eval_batch_size,
    example_batch,
)
from .config import ConfigError, ConfigSources, load_config, validate_config
from .hooks import GradientSyncHook, MetricsEvalHook, NonFiniteGuardHook, RankConsistencyHook
from .parallel import DistributedDataParallel, unwrap_batch
from .pruning import ProgressivePruningHook, SparsityHook
from .quantization import QuantizationHook
from .runner import CompressionEpochBasedRunner
from .upstream import prepare_bevfusion

LOGGER_NAME = "bevfusion_ext"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """torchpack's `dist.init` (MPI ranks, TCP rendezvous) on gloo for CPU and nccl for GPU; plain `python` = 1 rank."""
    if tdist.is_initialized():
        return
    if "MASTER_HOST" not in os.environ:
        if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "MASTER_HOST is not set for a multi-process launch: start training with "
                "'torchpack dist-run -np N python tools/train_compressed.py ...'"
            )
        os.environ["MASTER_HOST"] = f"127.0.0.1:{_free_port()}"
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    tp_dist.init(backend=backend)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_dist.local_size()))
    if torch.cuda.is_available():
        torch.cuda.set_device(tp_dist.local_rank())


def _shared_run_dir(config_path: str, run_dir: str | None) -> Path:
    """Rank 0 names the run directory (default `runs/<config>-<time>`) and every rank uses that name."""
    name = [run_dir or f"runs/{Path(config_path).stem}-{time.strftime('%Y%m%d_%H%M%S')}"]
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.broadcast_object_list(name, src=0)
    path = Path(name[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_config(config_path: str, opts: list[str]) -> tuple[Config, ConfigSources]:
    """Load (config tree, then `--recipe` files, then overrides), evaluate and validate before any process group
    exists."""
    prepare_bevfusion(config_path)
    cfg, sources = load_config(config_path, opts)
    validate_config(cfg, sources)
    check_registered(cfg, sources)
    compression_recipe(cfg, sources)
    return cfg, sources


def compression_recipe(cfg: Config, sources: ConfigSources) -> CompressionRecipe:
    """The validated `compression:` section, with recipe errors reported against the file that set the key."""
    try:
        return parse_recipe(cfg.get("compression"))
    except RecipeError as err:
        raise sources.error(err.key, err.problem, err.fix) from None


def _seed_everything(seed: int | None) -> None:
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer_hook(cfg: Config, logger: Any) -> Any:
    """OptimizerHook (grad clip), or Fp16OptimizerHook when fp16 is configured and a GPU exists."""
    opt_cfg = dict(cfg.get("optimizer_config") or {})
    fp16 = cfg.get("fp16")
    if fp16 is not None and not torch.cuda.is_available():
        logger.info("fp16 is configured but needs CUDA: training in FP32 on the CPU")
        fp16 = None
    if fp16 is not None:
        return Fp16OptimizerHook(**opt_cfg, **fp16, distributed=True)
    return OptimizerHook(**opt_cfg)


def _configure_wandb(cfg: Config, run_dir: Path) -> None:
    """wandb logs offline into the run directory unless the user chose otherwise (WANDB_MODE or init_kwargs)."""
    if any(h.get("type") == "WandbLoggerHook" for h in cfg.log_config.hooks):
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_SILENT", "true")


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor) or hasattr(obj, "tensor"):  # tensors and mmdet3d's box / point structures
        return obj.to(device)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def train(config_path: str, opts: list[str], run_dir: str | None = None) -> Path:
    """Run BEVFusion-style distributed training (with the config's compression recipe); returns the run directory."""
    cfg, sources = prepare_config(config_path, opts)
    recipe = compression_recipe(cfg, sources)
    init_distributed()
    _seed_everything(cfg.get("seed"))
    # Everything that can reject the inputs (datasets, model, checkpoint fit, recipe groups) runs before the run
    # directory exists, so a bad config or checkpoint writes nothing.
    device = torch.device("cuda", tp_dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    train_set = build_dataset(cfg.data.train, "data.train", sources)
    example = _to_device(example_batch(train_set), device)
    model = build_model(cfg, sources).to(device)
    checkpoint, state = _restore_compressed_architecture(cfg, model, example)
    if recipe.pruning is not None:
        _check_groups(recipe.pruning, model, sources)

    out = _shared_run_dir(config_path, run_dir)
    cfg.run_dir = str(out)
    timestamp = time.strftime("%Y%m%d_%H%M%S")
    logger = get_logger(LOGGER_NAME, log_file=str(out / f"{timestamp}.log"))
    if tp_dist.rank() == 0:
        cfg.dump(str(out / "configs.yaml"))
    logger.info("config %s, world size %d, run dir %s", config_path, tp_dist.size(), out)

    def rewrap(bare: torch.nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(
            bare,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=cfg.get("find_unused_parameters", False),
        )

    def new_optimizer(ddp: DistributedDataParallel) -> torch.optim.Optimizer:
        return build_optimizer(ddp, cfg.optimizer)

    ddp = rewrap(model)
    runner = CompressionEpochBasedRunner(
        model=ddp,
        optimizer=new_optimizer(ddp),
        work_dir=str(out),
        logger=logger,
        meta={},
        max_epochs=cfg.runner.max_epochs,
    )
    runner.timestamp = timestamp
    runner.compression_state = state
    runner.set_dataset([train_set])
    _configure_wandb(cfg, out)
    runner.register_training_hooks(
        cfg.get("lr_config"),
        _optimizer_hook(cfg, logger),
        cfg.checkpoint_config,
        cfg.log_config,
        cfg.get("momentum_config"),
        custom_hooks_config=cfg.get("custom_hooks"),
    )
    runner.register_hook(DistSamplerSeedHook())
    runner.register_hook(RankConsistencyHook(), priority="ABOVE_NORMAL")
    _register_eval(runner, cfg, sources)
    runner.register_hook(NonFiniteGuardHook(), priority="NORMAL")  # after the optimizer hook's backward + step
    runner.register_hook(GradientSyncHook(), priority="NORMAL")
    if recipe.quantization is not None:
        def calib_batches() -> Any:
            loader = build_dataloader(train_set, eval_batch_size(cfg, train_set), 0, False, cfg.get("seed"))
            return map(unwrap_batch, loader)

        runner.register_hook(QuantizationHook(recipe.quantization, calib_batches, rewrap, new_optimizer),
                             priority="NORMAL")
    if recipe.pruning is not None:
        # NORMAL: after the LR hook sets this iteration's LR, and (after_train_iter) after the optimizer hook's backward
        runner.register_hook(ProgressivePruningHook(recipe.pruning, example, rewrap, new_optimizer), priority="NORMAL")
        if recipe.pruning.sparsity is not None:  # HIGH: its penalty joins the loss before the optimizer hook's backward
            runner.register_hook(SparsityHook(recipe.pruning, example), priority="HIGH")

    if cfg.get("resume_from"):
        runner.preload(cfg.resume_from, checkpoint)
        runner.resume(cfg.resume_from, map_location="cpu")
    elif cfg.get("load_from"):
        logger.info("loaded checkpoint %s (strict, weights only)", cfg.load_from)  # loaded before the run dir existed
    loader = build_dataloader(train_set, cfg.data.samples_per_gpu, cfg.data.workers_per_gpu, True, cfg.get("seed"))
    runner.run([loader], [("train", 1)])
    return out


def _restore_compressed_architecture(cfg: Config, model: torch.nn.Module, example: dict) -> tuple[dict | None, dict]:
    """Rebuild the compressed architecture recorded in the checkpoint to load, before DDP, optimizer and weights."""
    path = cfg.get("resume_from") or cfg.get("load_from")
    if not path:
        return None, empty_state()
    checkpoint = read_checkpoint(path)
    if cfg.get("resume_from"):
        _check_world_size(checkpoint, path)
    state = copy.deepcopy(checkpoint.get("meta", {}).get("compression")) or empty_state()
    restore_architecture(model, state, example, path)
    load_state_dict_strict(model, checkpoint_weights(checkpoint), path)  # a misfit fails before anything is written
    if not cfg.get("resume_from"):
        state.pop("schedule", None)  # a new run starts its own recipe schedule from the loaded model
    return checkpoint, state


def _check_world_size(checkpoint: dict, path: str) -> None:
    """Refuse a resume on another process count: data order, iterations per epoch and schedule would differ."""
    saved = checkpoint.get("meta", {}).get("world_size")
    if saved is not None and saved != tp_dist.size():
        raise ConfigError(
            f"resume_from {path}: the checkpoint was written by a {saved}-process run and this run has "
            f"{tp_dist.size()}; resuming would change the data order, the iterations per epoch and the compression "
            f"schedule. Relaunch with 'torchpack dist-run -np {saved} ...', or start a new schedule from these weights "
            f"with --load_from {path} (the compressed architecture is kept; optimizer and schedule start afresh)"
        )


def _check_groups(recipe: PruningRecipe, model: torch.nn.Module, sources: ConfigSources) -> None:
    try:
        check_groups(recipe, [n for n, _ in model.named_modules()])
        check_structure(recipe, model)
    except RecipeError as err:
        raise sources.error(err.key, err.problem, err.fix) from None


def _register_eval(runner: CompressionEpochBasedRunner, cfg: Config, sources: ConfigSources) -> None:
    """Distributed evaluation on the val split after epochs (and before training with `evaluation.start: 0`)."""
    eval_cfg = dict(cfg.get("evaluation") or {})
    if eval_cfg.pop("enabled", True) is False:
        return
    val_set = build_dataset(cfg.data.val, "data.val", sources)
    loader = build_dataloader(
        val_set,
        eval_batch_size(cfg, val_set),
        cfg.data.workers_per_gpu,
        False,
        cfg.get("seed"),
    )
    eval_cfg.setdefault("tmpdir", os.path.join(runner.work_dir, ".eval_hook"))
    runner.register_hook(MetricsEvalHook(loader, **eval_cfg), priority="LOW")
