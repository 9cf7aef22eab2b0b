"""Shared building blocks. A layer is defined once here and imported by every family that uses it."""
from vitkit.layers.attention import Attention, AttentionMaps, RecordsAttention, attend, record_attention
from vitkit.layers.block import Block
from vitkit.layers.drop import DropPath, drop_path, drop_path_rates
from vitkit.layers.layer_scale import LayerScale
from vitkit.layers.mlp import ACTIVATIONS, Mlp, QuickGELU, make_act
from vitkit.layers.patch_embed import PatchEmbed, to_2tuple
from vitkit.layers.pos_embed import resample_pos_embed, sinusoidal_table
from vitkit.layers.pos_embed_rel import num_relative_distances, relative_position_index, resize_rel_pos_bias_table

__all__ = ["Attention", "AttentionMaps", "RecordsAttention", "attend", "record_attention", "Block", "DropPath", "drop_path",
           "drop_path_rates", "LayerScale", "ACTIVATIONS", "Mlp", "QuickGELU", "make_act", "PatchEmbed", "to_2tuple",
           "resample_pos_embed", "sinusoidal_table", "relative_position_index", "resize_rel_pos_bias_table", "num_relative_distances"]
