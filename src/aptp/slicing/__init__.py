"""Physical slicing of layers (torch only): one function per layer kind, each with shape checks."""

from .checks import check_layer_attributes
from .layers import select_channels, slice_conv2d, slice_group_norm, slice_linear

__all__ = ["check_layer_attributes", "select_channels", "slice_conv2d", "slice_group_norm", "slice_linear"]
