"""Shared building blocks. A layer is defined once here and imported by every family that uses it."""
from vitkit.layers.attention import Attention, AttentionMaps, RecordsAttention, attend, record_attention
from vitkit.layers.block import Block
from vitkit.layers.conv import ConvNormAct, StdConv2d, pad_same
from vitkit.layers.deformable_attention import DeformableAttention
from vitkit.layers.drop import DropPath, drop_path, drop_path_rates
from vitkit.layers.layer_scale import LayerScale
from vitkit.layers.mlp import ACTIVATIONS, DWConvMlp, Mlp, QuickGELU, make_act
from vitkit.layers.neighborhood_attention import NeighborhoodAttention
from vitkit.layers.patch_embed import HybridEmbed, PatchEmbed, to_2tuple
from vitkit.layers.performer import favor_attention, implied_attention, orthogonal_features
from vitkit.layers.pos_embed import resample_pos_embed, sinusoid_table
from vitkit.layers.pos_embed_rel import (RelativePositionBias, num_relative_distances, relative_position_index,
                                       resize_rel_pos_bias_table)
from vitkit.layers.resnet import ResNetBackbone, ResNetBottleneck, ResNetStage, ResNetStem
from vitkit.layers.spatial_reduction import SpatialReductionAttention

__all__ = ["Attention", "AttentionMaps", "RecordsAttention", "attend", "record_attention", "Block", "ConvNormAct",
           "StdConv2d", "pad_same", "DropPath", "drop_path", "drop_path_rates", "LayerScale", "ACTIVATIONS", "Mlp",
           "DWConvMlp", "QuickGELU", "make_act", "PatchEmbed", "HybridEmbed", "to_2tuple", "favor_attention",
           "implied_attention", "orthogonal_features", "resample_pos_embed", "sinusoid_table",
           "relative_position_index", "resize_rel_pos_bias_table", "num_relative_distances", "RelativePositionBias",
           "SpatialReductionAttention", "DeformableAttention", "NeighborhoodAttention", "ResNetBackbone",
           "ResNetBottleneck", "ResNetStage", "ResNetStem"]
