from llamavid_jax.models.config import LlamaVidConfig, LlmConfig, QFormerConfig, VisionConfig
from llamavid_jax.models.llamavid import LlamaVid, splice_labels, splice_layout

__all__ = ["LlamaVid", "LlamaVidConfig", "LlmConfig", "QFormerConfig", "VisionConfig",
           "splice_labels", "splice_layout"]
