"""Serving pipelines: ``APTPPipeline`` and how one is assembled from a router and its experts."""

from .aptp import APTPPipeline, APTPPipelineOutput

__all__ = ["APTPPipeline", "APTPPipelineOutput"]
