"""Training data: text and JSONL records into token windows and masked examples, chat templates."""
