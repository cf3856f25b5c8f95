"""Luigi tasks, one per stage: parameters -> stage subprocess -> atomic stage folder."""
