"""A fine-tuning run: options, the lr schedule, and the loop that checks, trains, logs and exports."""
