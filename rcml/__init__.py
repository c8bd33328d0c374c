"""RCML: relation-conditioned multimodal pretraining (arXiv 2508.17497) at scale."""

__version__ = "0.1.0"


def from_pretrained(path, map_location="cpu"):
    """Load an exported model: ``rcml.from_pretrained("runs/demo/export").model``."""
    from rcml.export import from_pretrained as _load

    return _load(path, map_location=map_location)
