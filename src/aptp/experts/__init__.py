"""Experts: the sliced sub-networks of one base model, built from a trained router."""

from .bank import APTPExpertBank

__all__ = ["APTPExpertBank"]
