"""
ION's context modules (section 3.2, Figure 3; alternatives of Table 7).

A context module reads one backbone feature and returns a feature named ``"context"`` with the
same stride, from which the ROI heads pool like from any backbone feature. The paper's model is
the 2x stacked 4-direction IRNN (:class:`IRNN`, its scans in
:mod:`ion_d2.modeling.context.irnn_scan`);
:class:`StackedConv` and :class:`GlobalAvgPool` are the alternatives compared in Table 7, and
:class:`IRNNAndStackedConv` is Table 10c's combination. Importing this package registers them
all in :data:`ION_CONTEXT_REGISTRY`.
"""

from .build import ION_CONTEXT_REGISTRY, build_ion_context, check_context_outputs_read
from .global_avg_pool import GlobalAvgPool
from .irnn import IRNN
from .irnn_and_stacked_conv import IRNNAndStackedConv
from .stacked_conv import StackedConv

__all__ = [
    "ION_CONTEXT_REGISTRY",
    "build_ion_context",
    "check_context_outputs_read",
    "IRNN",
    "StackedConv",
    "GlobalAvgPool",
    "IRNNAndStackedConv",
]
