"""nbp: Next-Block Prediction video generation, reproduced end to end."""

__version__ = "0.1.0"


def load_magvit2(*args, **kwargs):
    """Load a video tokenizer (ours or a released magvit2_*.pt); see nbp.tokenizer.load_magvit2."""
    from nbp.tokenizer import load_magvit2 as _load

    return _load(*args, **kwargs)


__all__ = ["__version__", "load_magvit2"]
