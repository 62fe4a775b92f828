"""The streamed step: block store, streamer, step plan, trainer, update rules, journal, optimizers, data parallel."""
