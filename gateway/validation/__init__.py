"""Checking Kling requests before they cost money: the rules (pure), media URLs (pure) and the DNS guard."""
