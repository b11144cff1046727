"""Stage ``train_generator``: next-block prediction on token shards (DDP under torchrun, or DeepSpeed ZeRO-2/3).

Each input position predicts the token at the same position of the next block (see
:class:`nbp.generator.layout.TaskLayout`); the loss covers video tokens only. AdamW with weight decay on
Linear weights only, linear warm-up then cosine to ``min_lr``, gradient clipping, dropout, condition
dropout (the condition positions get the learned unconditional embedding, for CFG).

Rolling state: ``{run.out}/checkpoints/train_generator/{name}/last.pt`` (DDP; weights, optimizer, RNG,
history) or ``.../deepspeed/`` (ZeRO shards with the same client state). A rerun resumes from it;
on CPU the resumed run is bit-identical to an uninterrupted one. Outputs (written atomically at the
end): ``generator.pt`` (format ``nbp-generator``; ZeRO shards are exported to fp32 with DeepSpeed's
``zero_to_fp32``), ``history.csv`` (one row per validation), ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

from nbp.checkpoint import inputs_fingerprint, load_checkpoint, save_checkpoint
from nbp.config import Config, ConfigError, TrainGeneratorConfig, to_dict
from nbp.distributed import DistInfo, cleanup_distributed, init_distributed, resolve_device
from nbp.errors import NbpError
from nbp.generator import FORMAT
from nbp.generator.data import BatchOrder, TokenShards
from nbp.generator.layout import IGNORE, BlockLayout, TaskLayout, ucf101_text_ids
from nbp.generator.model import GPT, gpt_config, grid_position_code
from nbp.io import atomic_dir, write_json
from nbp.tracking import Tracker, progress

TRAIN_FORMAT = "nbp-generator-train"
HISTORY_COLUMNS = ["step", "train_loss", "val_loss", "acc1", "acc5", "lr", "tokens_per_s"]
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
    neighbours, which a short run cannot learn from scratch for every cell (embedded: val loss 2.38 -> 2.17
    at 320 steps)."""
    coords = task.target_coords()  # [seq_len, 3]
    valid = coords[:, 0] >= 0
    code = grid_position_code(coords[valid], task.layout.grid, model.config.n_embd)  # [n, C]
    with torch.no_grad():
        model.pos_emb[0, :len(coords)][valid] = scale * code.to(model.pos_emb.dtype)


def lr_at(step: int, g: TrainGeneratorConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if step < g.warmup_steps:
        return g.lr * (step + 1) / g.warmup_steps
    frac = min(1.0, (step - g.warmup_steps) / max(1, g.steps - g.warmup_steps))
    return g.min_lr + 0.5 * (g.lr - g.min_lr) * (1 + math.cos(math.pi * frac))


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


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
# the trainer


@dataclass
class Interval:
    """Running sums between two history rows (saved in checkpoints so resumed rows match)."""

    loss: float = 0.0
    acc1: float = 0.0
    acc5: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss: float, acc1: float, acc5: float, tokens: int, seconds: float) -> None:
        self.loss, self.acc1, self.acc5 = self.loss + loss, self.acc1 + acc1, self.acc5 + acc5
        self.steps, self.tokens, self.seconds = self.steps + 1, self.tokens + tokens, self.seconds + seconds


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    interval: Interval = field(default_factory=Interval)
    total_tokens: int = 0
    total_seconds: float = 0.0
    wandb_run_id: str | None = None

    def to_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "interval": vars(self.interval), "total_tokens": self.total_tokens,
                "total_seconds": self.total_seconds, "wandb_run_id": self.wandb_run_id}

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(d["step"], list(d["history"]), Interval(**d["interval"]), d["total_tokens"], d["total_seconds"],
                   d["wandb_run_id"])


class Trainer:
    def __init__(self, cfg: Config, name: str):
        self.cfg, self.name = cfg, name
        g = self.g = cfg.entry("train_generator", name)
        self.device = resolve_device(cfg.run.device)
        self.deepspeed = g.strategy.startswith("deepspeed")
        if self.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", str(_free_port()))):
                os.environ.setdefault(k, v)
        self.dist: DistInfo = init_distributed(self.device)
        world = self.dist.world_size
        if g.batch_size % (world * g.grad_accum):
            raise ConfigError(f"train_generator.{name}.batch_size",
                              f"{g.batch_size} is not divisible by world size {world} x grad_accum {g.grad_accum}",
                              cfg.params_file)
        self.micro = g.batch_size // (world * g.grad_accum)

        tok_dir = cfg.out_dir("tokenize", g.tokens)
        self.inputs_id = inputs_fingerprint(tok_dir)
        self.train_data = TokenShards(tok_dir, "train")
        self.val_data = TokenShards(tok_dir, "val")
        self.meta = self.train_data.meta
        self.task = build_task(g, self.meta)
        self.order = BatchOrder(len(self.train_data), g.batch_size, seed=g.seed)
        self.ckpt_dir = Path(cfg.run.out) / "checkpoints" / "train_generator" / name
        self.out_dir = cfg.out_dir("train_generator", name)

        torch.manual_seed(g.seed + self.dist.rank)
        use_flex = g.flex_attention and self.device.type == "cuda"
        self.model_config = gpt_config(g.preset, vocab_size=self.task.vocab_size, n_positions=self.task.seq_len,
                                       dropout=g.dropout, cond_len=self.task.cond_len, flex_attention=use_flex)
        self.model = GPT(self.model_config)
        if g.pos_init == "grid":
            init_grid_positions(self.model, self.task, g.pos_init_scale)
        self.model.to(self.device)
        self.num_params = self.model.num_params()  # before ZeRO-3 partitions the parameters
        if g.cond_dropout <= 0:  # never used in training: frozen (DDP needs every trained parameter to get a gradient)
            self.model.uncond_embedding.requires_grad_(False)
        self.mask = self.task.block_mask(device=self.device) if use_flex else self.task.dense_mask(device=self.device)
        autocast = g.bf16 and self.device.type == "cuda" and not self.deepspeed  # DeepSpeed casts the model itself
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, g.weight_decay), lr=g.lr, betas=tuple(g.betas),
                                           fused=self.device.type in ("cuda", "cpu") or None)  # CPU: ~6% per tiny step
        if self.deepspeed:
            import deepspeed

            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.model, optimizer=self.optimizer, config=deepspeed_config(g, self.micro, world, self.device))
            self.net = self.engine
        else:
            self.engine = None
            self.net = nn.parallel.DistributedDataParallel(self.model) if self.dist.enabled else self.model
        self.state = TrainState()

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

    def train_step(self, step: int) -> dict:
        g = self.g
        lr = lr_at(step, g)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.net.train()
        micro_batches = self.order.micro_batches(step, self.dist.rank, self.dist.world_size, g.grad_accum)
        sums = torch.zeros(3, device=self.device)  # on the device: one sync per step, and nccl can reduce it
        for i, idx in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if self.engine is not None:
                loss, stats = self.forward_loss(idx)
                self.engine.backward(loss)  # DeepSpeed scales by 1/grad_accum itself
                self.engine.step()  # optimizer step (with clipping) at the accumulation boundary only
            else:
                sync = self.net.no_sync() if (self.dist.enabled and not last) else contextlib.nullcontext()
                with sync:
                    loss, stats = self.forward_loss(idx)
                    (loss / g.grad_accum).backward()
            sums += torch.stack([loss.detach().float(), stats["acc1"], stats["acc5"]]) / g.grad_accum
        if self.engine is None:
            if g.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), g.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.dist.enabled:
            dist.all_reduce(sums)
            sums /= self.dist.world_size
        loss, acc1, acc5 = sums.tolist()
        return {"loss": loss, "acc1": acc1, "acc5": acc5, "lr": lr}

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-block loss over (up to ``val_clips``) validation clips, split across ranks."""
        self.net.eval()
        world = self.dist.world_size
        n = min(len(self.val_data), self.g.val_clips) // world * world  # equal shares: every rank runs as many forwards
        mine = torch.arange(n)[self.dist.rank::world]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for idx in mine.split(self.micro):
            inp, tgt = self.inputs(self.val_data, idx)
            with self.amp:
                logits = self.net(inp, self.mask)
            V = logits.shape[-1]
            loss = F.cross_entropy(logits.reshape(-1, V).float(), tgt.reshape(-1), ignore_index=IGNORE, reduction="sum")
            total += torch.stack([loss.double(), (tgt != IGNORE).sum().double()])
        if self.dist.enabled:
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    # ---- checkpoints ----------------------------------------------------------------------
    def _rng_states(self) -> list:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.dist.enabled:
            return [state]
        gathered = [None] * self.dist.world_size
        dist.all_gather_object(gathered, state)
        return gathered

    def _set_rng(self, states: list) -> None:
        if len(states) != self.dist.world_size:
            return  # another world size: the data order still resumes exactly, dropout noise does not
        state = states[self.dist.rank]
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)

    def _describe(self) -> dict:
        return {"config": self.model_config.to_dict(), "task": self.task.describe(), "params": to_dict(self.g),
                "inputs": self.inputs_id}

    def save(self) -> None:
        client = {"format": TRAIN_FORMAT, "version": 1, **self._describe(), "state": self.state.to_dict(),
                  "rng": self._rng_states()}
        if self.dist.is_main:
            write_json(self.ckpt_dir / "run.json", self._describe())
        if self.engine is not None:
            ds_dir = self.ckpt_dir / "deepspeed"
            tag = f"step{self.state.step}"
            self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state={"nbp": client})  # writes `latest` when done
            if self.dist.enabled:
                dist.barrier()
            if self.dist.is_main:
                for old in ds_dir.iterdir():
                    if old.is_dir() and old.name != tag:
                        shutil.rmtree(old)
            return
        if self.dist.is_main:
            save_checkpoint(self.ckpt_dir / "last.pt", {**client, "model": self.model.state_dict(),
                                                         "optimizer": self.optimizer.state_dict()})
        if self.dist.enabled:
            dist.barrier()

    def _stale(self, client: dict) -> list[str]:
        """What differs between a rolling checkpoint's run and this one (model, task, params or input tokens)."""
        mine = self._describe()
        return [k for k in mine if client.get(k) != mine[k]]

    def _start_over(self, stale: list[str]) -> None:
        """A rolling checkpoint of other settings or other tokens is not resumed: it is deleted, training starts over."""
        if self.dist.is_main:
            print(f"train_generator {self.name}: rolling checkpoint in {self.ckpt_dir} was made with other "
                  f"{', '.join(stale)}; starting over")
            shutil.rmtree(self.ckpt_dir)
        if self.dist.enabled:
            dist.barrier()

    def resume(self) -> bool:
        run_file = self.ckpt_dir / "run.json"  # written with every checkpoint: judged before loading any shard
        if run_file.is_file() and (stale := self._stale(json.loads(run_file.read_text()))):
            self._start_over(stale)
        if self.engine is not None:
            ds_dir = self.ckpt_dir / "deepspeed"
            if not (ds_dir / "latest").is_file():
                return False
            _, client = self.engine.load_checkpoint(str(ds_dir))
            client = client["nbp"]
            where = ds_dir
        else:
            where = self.ckpt_dir / "last.pt"
            if not where.is_file():
                return False
            client = load_checkpoint(where, expect=TRAIN_FORMAT)
            if stale := self._stale(client):  # no run.json beside it (an older checkpoint): its own description
                self._start_over(stale)
                return False
            self.model.load_state_dict(client["model"])
            self.optimizer.load_state_dict(client["optimizer"])
        if self._stale(client):
            raise NbpError(f"{where}: rolling checkpoint is for other settings; delete {self.ckpt_dir} to start over")
        self.state = TrainState.from_dict(client["state"])
        self._set_rng(client["rng"])
        return True

    def final_state_dict(self) -> dict:
        """fp32 weights: the model's own, or the ZeRO shards merged by DeepSpeed's zero_to_fp32."""
        if self.engine is None:
            return {k: v.detach().cpu().float() for k, v in self.model.state_dict().items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ds_dir = self.ckpt_dir / "deepspeed"
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=f"step{self.state.step}")
        frozen = {k: v.detach().cpu().float() for k, v in self.model.state_dict().items() if k not in sd}
        return {**{k: v.float() for k, v in sd.items()}, **frozen}  # parameters without gradients are not in the shards

    # ---- the loop -------------------------------------------------------------------------
    def history_row(self, step: int, lr: float) -> dict:
        iv = self.state.interval
        row = {"step": step, "train_loss": iv.loss / max(iv.steps, 1), "val_loss": self.validate(),
               "acc1": iv.acc1 / max(iv.steps, 1), "acc5": iv.acc5 / max(iv.steps, 1), "lr": lr,
               "tokens_per_s": iv.tokens / iv.seconds if iv.seconds > 0 else float("nan")}
        self.state.interval = Interval()
        return row

    def fit(self, stop_at: int | None = None) -> bool:
        """Train to ``g.steps`` (or stop after step ``stop_at``, as a kill would); True when finished."""
        if self.resume() and self.dist.is_main:
            print(f"train_generator {self.name}: resumed at step {self.state.step}")
        g, st = self.g, self.state
        tracker = Tracker(project=self.cfg.run.wandb.project, name=f"train_generator/{self.name}", config=to_dict(g),
                          mode=self.cfg.run.wandb.mode, entity=self.cfg.run.wandb.entity, run_id=st.wandb_run_id,
                          dir=str(Path(self.cfg.run.out) / "logs" / "train_generator" / self.name), rank=self.dist.rank)
        st.wandb_run_id = tracker.run_id or st.wandb_run_id
        tokens_per_step = g.batch_size * self.task.seq_len
        bar = progress(total=g.steps, initial=st.step, desc=f"train_generator {self.name}", unit="step")
        try:
            while st.step < g.steps:
                t0 = time.perf_counter()
                m = self.train_step(st.step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                st.step += 1
                st.interval.add(m["loss"], m["acc1"], m["acc5"], tokens_per_step, dt)
                st.total_tokens += tokens_per_step
                st.total_seconds += dt
                bar.update(1)
                logs = {"train/loss": m["loss"], "train/acc1": m["acc1"], "train/acc5": m["acc5"], "lr": m["lr"],
                        "tokens_per_s": tokens_per_step / dt}
                if st.step % g.val_every == 0 or st.step == g.steps:
                    row = self.history_row(st.step, m["lr"])
                    st.history.append(row)
                    logs["val/loss"] = row["val_loss"]
                    bar.set_postfix(loss=f"{m['loss']:.3f}", val=f"{row['val_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if st.step % g.log_every == 0 or "val/loss" in logs:
                    tracker.log(logs, step=st.step)
                if st.step % g.checkpoint_every == 0 or st.step == g.steps:
                    self.save()
                if stop_at is not None and st.step >= stop_at and st.step < g.steps:
                    return False
        finally:
            bar.close()
            tracker.finish()
        self.export()
        return True

    def export(self) -> None:
        sd = self.final_state_dict()
        if not self.dist.is_main:
            return
        st = self.state
        val = st.history[-1]["val_loss"] if st.history else None
        ckpt = {"format": FORMAT, "version": 1, **self._describe(), "model": sd, "step": st.step,
                "classes": self.meta.get("classes", []), "tokenizer": self.meta.get("tokenizer"), "source": "train"}
        metrics = {"val_loss": val, "train_loss": st.history[-1]["train_loss"] if st.history else None,
                   "tokens_per_s": st.total_tokens / st.total_seconds if st.total_seconds else None,
                   "train_seconds": round(st.total_seconds, 2), "steps": st.step, "params": self.num_params,
                   "device": device_name(self.device), "world_size": self.dist.world_size, "strategy": self.g.strategy,
                   "task": self.task.task, "block": list(self.task.layout.block), "seq_len": self.task.seq_len,
                   "generation_steps": self.task.steps}
        with atomic_dir(self.out_dir) as tmp:
            save_checkpoint(tmp / "generator.pt", ckpt)
            pd.DataFrame(st.history, columns=HISTORY_COLUMNS).to_csv(tmp / "history.csv", index=False)
            write_json(tmp / "metrics.json", metrics)


def run_train_generator(cfg: Config, name: str, *, stop_at: int | None = None) -> None:
    """Train one generator entry (``source: released`` entries are imported by nbp.generator.released)."""
    g = cfg.entry("train_generator", name)
    if g.source == "released":
        from nbp.generator.released import run_import_released

        return run_import_released(cfg, name)
    try:
        Trainer(cfg, name).fit(stop_at=stop_at)
    finally:
        cleanup_distributed()
