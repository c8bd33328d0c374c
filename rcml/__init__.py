"""RCML: relation-conditioned multimodal pretraining (arXiv 2508.17497) at scale."""

__version__ = "0.1.0"


def from_pretrained(path, map_location="cpu"):
    """Load an exported model: ``m = rcml.from_pretrained("runs/demo/rcml/export")``, then
    ``m.embed_images(images, relations)`` / ``m.embed_texts(texts, relations)`` (rcml/embedding.py). The folder is
    also a transformers CLIP folder (``CLIPModel.from_pretrained``, ``AutoTokenizer.from_pretrained``): rcml/export.py."""
    from rcml.export import from_pretrained as _load

    return _load(path, map_location=map_location)
