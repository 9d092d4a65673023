"""Tenancy, limits, budgets, prices, the usage ledger and showback: what inferd knows about who spends what."""
