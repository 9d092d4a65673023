"""Tenancy: keys and teams, rate limits and budgets, the price book, the usage ledger and showback."""
