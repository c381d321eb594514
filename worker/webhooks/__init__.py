"""Webhooks: the outbox written with each state change, signing, URL policy and delivery."""
