"""vitkit: Vision Transformers on PyTorch, faithful to the papers, loading every public checkpoint format."""
from vitkit.layers.attention import record_attention
from vitkit import registry
from vitkit.registry import PreprocessConfig, create_model, get_spec, list_models, load_model, save_pretrained

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "get_spec", "load_model", "save_pretrained", "record_attention",
           "PreprocessConfig", "__version__"]
