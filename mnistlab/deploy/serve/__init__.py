"""A draw-a-digit page and a JSON API over trained runs (FastAPI; needs the serve extra)."""
