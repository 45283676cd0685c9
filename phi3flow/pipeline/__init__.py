"""main: the stages in order, chained by run IDs; main's config; when a finished run is reused."""
