"""``gridtrade simulate``: a scenario of many sites run on the real services."""
