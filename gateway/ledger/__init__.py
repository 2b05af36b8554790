"""The task ledger: recording submissions, pricing, budgets and spend, settling tasks, usage reports."""
