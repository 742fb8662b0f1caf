"""Dropless mixture-of-experts: router → expert backend → weighted combine."""
