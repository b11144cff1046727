"""The NBP generator: layouts and masks (``layout``), transformer (``model``), token shards (``data``; written by
:mod:`nbp.tokenizer.tokenize`), sampling, training (``train``), evaluation, released-checkpoint import.
``load_generator`` opens a trained (or imported released) generator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbp.errors import NbpError

if TYPE_CHECKING:  # imports stay lazy: `import nbp.generator` must not pull torch-heavy modules
    from nbp.generator.layout import TaskLayout
    from nbp.generator.model import GPT

FORMAT = "nbp-generator"
HISTORY_COLUMNS = ["step", "train_loss", "val_loss", "acc1", "acc5", "lr", "tokens_per_s"]  # history.csv


@dataclass
class LoadedGenerator:
    """A generator ready to sample: the model (eval mode), its task layout and what it was trained on."""

    model: GPT
    task: TaskLayout
    classes: list[dict] = field(default_factory=list)  # [{"label", "name", "text"}], as in classes.json
    tokenizer: str | None = None  # the tokenizer checkpoint its codes come from
    info: dict[str, Any] = field(default_factory=dict)  # step, source, train params, ...

    def __call__(self, ids):
        """Model-layout ids [B, L] -> logits [B, L, vocab] under the task's mask (see nbp.generator.sampling)."""
        from nbp.generator.sampling import layout_logits

        return layout_logits(self.model, self.task, ids)

    def generate(self, prefix_ids, max_new_tokens=None, **kwargs):
        """Prefix ids [B, P] -> prefix + new ids (``greedy``, ``temperature``, ``top_k``, ``top_p``, ``cfg``,
        ``generator``, ...: see nbp.generator.sampling.generate)."""
        from nbp.generator.sampling import generate

        return generate(self.model, self.task, prefix_ids, max_new_tokens, **kwargs)


def generator_from_checkpoint(ckpt: dict, device="cpu", source: str = "generator checkpoint") -> LoadedGenerator:
    """Build a LoadedGenerator from an ``nbp-generator`` checkpoint dict (``source`` names it in errors)."""
    from nbp.generator.layout import TaskLayout
    from nbp.generator.model import GPT, GPTConfig

    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        task = TaskLayout.from_dict(ckpt["task"])
    except (KeyError, TypeError, ValueError) as e:
        raise NbpError(f"{source}: bad generator config or task ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise NbpError(f"{source}: weights do not match the generator config ({' '.join(first[:2])[:300]})") from None
    model.prepare_inference(device=device)  # eval mode, fused QKV (state-dict names unchanged)
    info = {k: v for k, v in ckpt.items() if k not in ("model", "config", "task", "classes", "tokenizer")}
    return LoadedGenerator(model, task, list(ckpt.get("classes", [])), ckpt.get("tokenizer"), info)


def load_generator(path: str | Path, device="cpu") -> LoadedGenerator:
    """Open ``generator.pt`` (format ``nbp-generator``) or, through ``nbp.generator.released``, a released .ckpt."""
    from nbp.checkpoint import load_checkpoint

    path = Path(path)
    if path.suffix == ".ckpt":
        from nbp.generator.released import load_released_generator  # it imports this package

        return load_released_generator(path, device=device)
    return generator_from_checkpoint(load_checkpoint(path, map_location="cpu", expect=FORMAT), device, source=str(path))


__all__ = ["FORMAT", "LoadedGenerator", "generator_from_checkpoint", "load_generator"]
