"""Explanations for every family: attention maps, rollout, gradient-weighted relevance, Grad-CAM, the ViT paper's
Figure 7, faithfulness checks (model randomisation, deletion) and a self-contained HTML report."""
from vitkit.explain.methods import METHODS, Explanation, attention_maps, explain, gradcam, relevance, rollout, upsample

__all__ = ["METHODS", "Explanation", "attention_maps", "explain", "gradcam", "relevance", "rollout", "upsample"]
