from llamavid_jax.models.config import InputSpec, LlamaVidConfig, LlmConfig, QFormerConfig, VisionConfig
from llamavid_jax.models.llamavid import LlamaVid
from llamavid_jax.models.splice import IGNORE, Layout, splice_labels, splice_layout, spliced_length

__all__ = ["IGNORE", "InputSpec", "Layout", "LlamaVid", "LlamaVidConfig", "LlmConfig", "QFormerConfig",
           "VisionConfig", "splice_labels", "splice_layout", "spliced_length"]
