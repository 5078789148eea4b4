"""Serving pipelines."""

from .aptp import APTPPipeline, APTPPipelineOutput

__all__ = ["APTPPipeline", "APTPPipelineOutput"]
