"""Stage ``train_generator``: next-block prediction on token shards (DDP under torchrun, or DeepSpeed ZeRO-2/3).

Each input position predicts the token at the same position of the next block (see
:class:`nbp.generator.layout.TaskLayout`); the loss covers video tokens only. AdamW with weight decay on
Linear weights only, linear warm-up then cosine to ``min_lr``, gradient clipping, dropout, condition
dropout (the condition positions get the learned unconditional embedding, for CFG). ``batch_size`` is the
global batch: each rank's micro-batch is ``batch_size / (world size x grad_accum)``.

The loop, rolling checkpoints (``{run.out}/checkpoints/train_generator/{name}/``: ``last.pt``, or ZeRO shards
under ``deepspeed/`` with the same client state), resume, history, W&B and the non-finite guard are
:mod:`nbp.training`'s; on CPU a resumed run is bit-identical to an uninterrupted one. Outputs (written atomically
at the end): ``generator.pt`` (format ``nbp-generator``; ZeRO shards are exported to fp32 with DeepSpeed's
``zero_to_fp32``), ``history.csv`` (one row per validation), ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

from nbp import dag
from nbp.checkpoint import inputs_fingerprint, save_checkpoint
from nbp.config import Config, ConfigError, TrainGeneratorConfig, to_dict
from nbp.distributed import cleanup_distributed, device_name, init_distributed, resolve_device
from nbp.errors import NbpError
from nbp.generator import FORMAT, HISTORY_COLUMNS
from nbp.generator.data import BatchOrder, TokenShards
from nbp.generator.layout import IGNORE, BlockLayout, TaskLayout, ucf101_text_ids
from nbp.generator.model import GPT, gpt_config, grid_position_code
from nbp.generator.released import run_import_released
from nbp.generator.sampling import count_steps
from nbp.io import atomic_dir, write_json
from nbp.training import Cadence, LoopState, Training, barrier, fit, resume_params, warmup_cosine, write_history

TRAIN_FORMAT = "nbp-generator-train"
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "workflow" / "deepspeed"


# --------------------------------------------------------------------------------------
# pieces


def build_task(gcfg: TrainGeneratorConfig, meta: dict) -> TaskLayout:
    """The task layout for token shards described by ``meta`` (tokenize's meta.json)."""
    classes = meta.get("classes") or []
    text_ids = ()
    if gcfg.task == "hybrid":
        table = ucf101_text_ids()
        missing = [c["name"] for c in classes if c["name"] not in table]
        if missing or not classes:
            raise NbpError(f"task hybrid needs the UCF-101 class names (LLaMA text ids); unknown: {missing[:3] or 'no classes'}")
        text_ids = tuple(tuple(table[c["name"]]) for c in sorted(classes, key=lambda c: c["label"]))
    try:
        layout = BlockLayout(tuple(meta["grid"]), tuple(gcfg.block))
        return TaskLayout(gcfg.task, layout, int(meta["vocab_size"]), num_classes=len(classes),
                          context_frames=gcfg.context_frames if gcfg.task == "frame_pred" else 0, text_ids=text_ids)
    except ValueError as e:
        raise NbpError(f"train_generator: {e}") from None


def init_grid_positions(model: GPT, task: TaskLayout, scale: float) -> None:
    """Set the position rows that predict a video token to ``scale`` x the sinusoidal code of that token's
    (t, h, w) cell (other rows keep their normal init). Positions then start out knowing which cells are
    neighbours, which a short run cannot learn from scratch for every cell (measured on the embedded experiment: see
    the README)."""
    coords = task.target_coords()  # [seq_len, 3]
    valid = coords[:, 0] >= 0
    code = grid_position_code(coords[valid], task.layout.grid, model.config.n_embd)  # [n, C]
    with torch.no_grad():
        model.pos_emb[0, :len(coords)][valid] = scale * code.to(model.pos_emb.dtype)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of Linear layers only (not biases, norms, embeddings, positions)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


def next_block_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on positions with a target (video tokens); top-1/top-5 accuracy on the same positions."""
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE)
    with torch.no_grad():
        valid = targets != IGNORE  # [B, L]
        top5 = logits.detach()[valid].topk(min(5, V), dim=-1).indices  # [n, 5]
        hit = top5 == targets[valid][:, None]
        stats = {"acc1": hit[:, 0].float().mean(), "acc5": hit.any(-1).float().mean()}
    return loss, stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(g: TrainGeneratorConfig, micro: int, world: int, device: torch.device) -> dict:
    """workflow/deepspeed/zero{2,3}.json with this entry's batch sizes, clipping and precision filled in."""
    path = DEEPSPEED_DIR / ("zero2.json" if g.strategy == "deepspeed_zero2" else "zero3.json")
    if not path.is_file():
        raise NbpError(f"{path}: DeepSpeed config not found (run from a checkout of the repository)")
    ds = json.loads(path.read_text())
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=g.grad_accum,
              train_batch_size=micro * g.grad_accum * world, gradient_clipping=g.grad_clip)
    ds["bf16"] = {"enabled": bool(g.bf16 and device.type == "cuda")}
    return ds


# --------------------------------------------------------------------------------------
# the training


class GeneratorTraining(Training):
    train_format = TRAIN_FORMAT
    shown = ("train_loss", "val_loss", "tokens_per_s")

    def __init__(self, cfg: Config, name: str, paths: dag.StagePaths):
        self.cfg, self.name, self.stage, self.paths = cfg, name, "train_generator", paths
        g = self.g = cfg.entry("train_generator", name)
        self.device = resolve_device(cfg.run.device)
        self.deepspeed = g.strategy.startswith("deepspeed")
        if self.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", str(_free_port()))):
                os.environ.setdefault(k, v)
        self.info = init_distributed(self.device)
        world = self.info.world_size
        if g.batch_size % (world * g.grad_accum):
            raise ConfigError(f"train_generator.{name}.batch_size",
                              f"{g.batch_size} is not divisible by world size {world} x grad_accum {g.grad_accum}",
                              cfg.params_file)
        self.micro = g.batch_size // (world * g.grad_accum)
        tok_dir = paths.need("tokens")
        self.inputs_id = inputs_fingerprint(tok_dir)
        self.train_data, self.val_data = TokenShards(tok_dir, "train"), TokenShards(tok_dir, "val")
        self.meta = self.train_data.meta
        self.task = build_task(g, self.meta)
        self.order = BatchOrder(len(self.train_data), g.batch_size, seed=g.seed)
        torch.manual_seed(g.seed + self.info.rank)
        self._build_model()
        self._build_optimizer()

    def _build_model(self) -> None:
        g, task = self.g, self.task
        use_flex = g.flex_attention and self.device.type == "cuda"
        self.model_config = gpt_config(g.preset, n_layer=g.n_layer, n_head=g.n_head, n_embd=g.n_embd,
                                       vocab_size=task.vocab_size, n_positions=task.seq_len, dropout=g.dropout,
                                       cond_len=task.cond_len, flex_attention=use_flex)
        self.model = GPT(self.model_config)
        if g.pos_init == "grid":
            init_grid_positions(self.model, task, g.pos_init_scale)
        self.model.to(self.device)
        self.num_params = self.model.num_params()  # before ZeRO-3 partitions the parameters
        if g.cond_dropout <= 0:  # never used in training: frozen (DDP needs every trained parameter to get a gradient)
            self.model.uncond_embedding.requires_grad_(False)
        self.mask = task.block_mask(device=self.device) if use_flex else task.dense_mask(device=self.device)
        autocast = g.bf16 and self.device.type == "cuda" and not self.deepspeed  # DeepSpeed casts the model itself
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def _build_optimizer(self) -> None:
        g = self.g
        self.optimizer = torch.optim.AdamW(param_groups(self.model, g.weight_decay), lr=g.lr, betas=tuple(g.betas),
                                           fused=self.device.type in ("cuda", "cpu") or None)
        self.engine = None
        if self.deepspeed:
            import deepspeed  # several seconds to import: only for the runs that use it

            ds = deepspeed_config(g, self.micro, self.info.world_size, self.device)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=ds)
            self.net = self.engine
        else:
            self.net = nn.parallel.DistributedDataParallel(self.model) if self.info.enabled else self.model

    # ---- one optimizer step -------------------------------------------------------------
    def inputs(self, data: TokenShards, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip indices -> (model input ids [b, L], next-block targets [b, L]) on the device."""
        codes, labels = data.batch(idx)
        seq = self.task.layout.to_blocks(codes).to(self.device)  # [b, N] block order
        return self.task.train_inputs(seq, self.task.cond_ids(labels.to(self.device)))

    def forward_loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        inp, tgt = self.inputs(self.train_data, idx)  # [b, L], [b, L]
        uncond = None
        if self.g.cond_dropout > 0 and self.task.cond_len > 0:
            uncond = torch.rand(inp.shape[0]) < self.g.cond_dropout  # global RNG: restored on resume
            uncond = uncond.to(self.device)
        with self.amp:
            logits = self.net(inp, self.mask, uncond=uncond)  # [b, L, V]
        return next_block_loss(logits, tgt)

    def set_lr(self, step: int) -> float:
        g = self.g
        lr = warmup_cosine(step, lr=g.lr, min_lr=g.min_lr, warmup=g.warmup_steps, total=g.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, step: int) -> dict[str, float]:
        g, info = self.g, self.info
        self.net.train()
        micro_batches = self.order.micro_batches(step, info.rank, info.world_size, g.grad_accum)
        sums = torch.zeros(3, device=self.device)  # on the device: one sync per step, and nccl can reduce it
        grad_norm = None
        for i, idx in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if self.engine is not None:
                loss, stats = self.forward_loss(idx)
                self.engine.backward(loss)  # DeepSpeed scales by 1/grad_accum itself
                self.engine.step()  # optimizer step (with clipping) at the accumulation boundary only
            else:
                sync = self.net.no_sync() if (info.enabled and not last) else contextlib.nullcontext()
                with sync:
                    loss, stats = self.forward_loss(idx)
                    (loss / g.grad_accum).backward()
            sums += torch.stack([loss.detach().float(), stats["acc1"], stats["acc5"]]) / g.grad_accum
        if self.engine is None:
            if g.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), g.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if info.enabled:
            dist.all_reduce(sums)
            sums /= info.world_size
        loss, acc1, acc5 = sums.tolist()
        out = {"loss": loss, "acc1": acc1, "acc5": acc5, "tokens": g.batch_size * self.task.seq_len}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-block loss over (up to ``val_clips``) validation clips, split across ranks."""
        self.net.eval()
        world = self.info.world_size
        n = min(len(self.val_data), self.g.val_clips) // world * world  # equal shares: every rank runs as many forwards
        mine = torch.arange(n)[self.info.rank::world]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for idx in mine.split(self.micro):
            inp, tgt = self.inputs(self.val_data, idx)
            with self.amp:
                logits = self.net(inp, self.mask)
            V = logits.shape[-1]
            loss = F.cross_entropy(logits.reshape(-1, V).float(), tgt.reshape(-1), ignore_index=IGNORE, reduction="sum")
            total += torch.stack([loss.double(), (tgt != IGNORE).sum().double()])
        if self.info.enabled:
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def history_row(self, state: LoopState) -> dict:
        w = state.window
        n = len(w["loss"])
        seconds = sum(w["seconds"])
        return {"step": state.step, "train_loss": sum(w["loss"]) / n, "val_loss": self.validate(),
                "acc1": sum(w["acc1"]) / n, "acc5": sum(w["acc5"]) / n, "lr": w["lr"][-1],
                "tokens_per_s": sum(w["tokens"]) / seconds if seconds > 0 else float("nan")}

    # ---- checkpoints ----------------------------------------------------------------------
    def describe(self) -> dict:
        return {"config": self.model_config.to_dict(), "task": self.task.describe(), "params": resume_params(to_dict(self.g)),
                "inputs": self.inputs_id}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        if self.engine is None:  # DeepSpeed loaded its shards in read()
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])

    def save(self, ckpt_dir: Path, client: dict) -> None:
        if self.engine is None:
            return super().save(ckpt_dir, client)
        ds_dir, tag = ckpt_dir / "deepspeed", f"step{client['step']}"
        self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state={"nbp": client})  # writes `latest` when done
        barrier(self.info)
        if self.info.is_main:
            for old in ds_dir.iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old)

    def read(self, ckpt_dir: Path) -> dict | None:
        if self.engine is None:
            return super().read(ckpt_dir)
        ds_dir = ckpt_dir / "deepspeed"
        if not (ds_dir / "latest").is_file():
            return None
        _, client = self.engine.load_checkpoint(str(ds_dir))
        return client["nbp"]

    def final_state_dict(self, step: int) -> dict:
        """fp32 weights: the model's own, or the ZeRO shards merged by DeepSpeed's zero_to_fp32."""
        if self.engine is None:
            return {k: v.detach().cpu().float() for k, v in self.model.state_dict().items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(self.paths.state / "deepspeed"), tag=f"step{step}")
        frozen = {k: v.detach().cpu().float() for k, v in self.model.state_dict().items() if k not in sd}
        return {**{k: v.float() for k, v in sd.items()}, **frozen}  # parameters without gradients are not in the shards

    def export(self, state: LoopState) -> None:
        sd = self.final_state_dict(state.step)
        if not self.info.is_main:
            return
        hist, paths = state.history, self.paths
        ckpt = {"format": FORMAT, "version": 1, **self.describe(), "params": to_dict(self.g), "model": sd, "step": state.step,
                "classes": self.meta.get("classes", []), "tokenizer": self.meta.get("tokenizer"), "source": "train"}
        tokens = state.step * self.g.batch_size * self.task.seq_len
        metrics = {"val_loss": hist[-1]["val_loss"] if hist else None, "train_loss": hist[-1]["train_loss"] if hist else None,
                   "tokens_per_s": tokens / state.seconds if state.seconds else None,
                   "train_seconds": round(state.seconds, 2), "steps": state.step, "params": self.num_params,
                   "device": device_name(self.device), "world_size": self.info.world_size, "strategy": self.g.strategy,
                   "task": self.task.task, "block": list(self.task.layout.block), "seq_len": self.task.seq_len,
                   "generation_steps": count_steps(self.task)}
        with atomic_dir(paths.folder) as tmp:
            save_checkpoint(tmp / paths.name("generator"), ckpt)
            write_history(tmp / paths.name("history"), hist, HISTORY_COLUMNS)
            write_json(tmp / paths.name("metrics"), metrics)


def run_train_generator(cfg: Config, name: str, paths: dag.StagePaths | None = None, *, stop_at: int | None = None) -> bool:
    """Train one generator entry (``source: released`` entries are imported by nbp.generator.released); False when
    stopped early at ``stop_at`` (as a kill would)."""
    paths = paths or dag.resolve(cfg, "train_generator", name)
    g = cfg.entry("train_generator", name)
    if g.source == "released":
        run_import_released(cfg, name, paths)
        return True
    try:
        training = GeneratorTraining(cfg, name, paths)
        cadence = Cadence(g.steps, row_every=g.val_every, log_every=g.log_every, checkpoint_every=g.checkpoint_every)
        wandb = {"project": cfg.run.wandb.project, "entity": cfg.run.wandb.entity, "mode": cfg.run.wandb.mode,
                 "config": to_dict(g)}
        return fit(training, cadence, paths.state, wandb, stop_at=stop_at)
    finally:
        cleanup_distributed()
