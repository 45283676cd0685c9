"""One thin script per MLproject entry point; run as `python -m steps.<entry_point>`."""
