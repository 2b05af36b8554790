"""Completion webhooks: signing and delivering a task's final status to its key's webhook URL."""
