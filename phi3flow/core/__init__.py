"""What every stage shares: names, errors, typed records, redaction, config machinery, a step's run, and the store adapter."""
