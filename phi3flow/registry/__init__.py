"""register: champion or challenger from evaluate's decision, with lineage."""
