"""Image-quality metrics (FID, CLIP-based scores) used by evaluation commands."""
